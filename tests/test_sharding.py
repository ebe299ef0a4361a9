"""Meshes, state shardings and batch-size checks (8 host devices, conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdml import sharding, train
from test_train import load_config


def test_batch_size_not_divisible_by_devices_names_both_numbers(tmp_path):
  config = load_config("sketchy_rtl.py")
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size=12 .* 8 devices"):
    train.train_and_evaluate(config, str(tmp_path))


def test_mesh_takes_the_remaining_devices_and_names_bad_shapes():
  assert dict(sharding.make_mesh({"data": -1}).shape) == {"data": 8}
  assert dict(sharding.make_mesh({"data": 2, "model": -1}).shape) == {"data": 2, "model": 4}
  assert dict(sharding.make_mesh({"data": 4}).shape) == {"data": 4}  # the first 4 devices
  with pytest.raises(ValueError, match="needs a 'data' axis"):
    sharding.make_mesh({"model": -1})
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh({"data": -1, "model": -1})
  with pytest.raises(ValueError, match="multiple of 3"):
    sharding.make_mesh({"data": 3, "model": -1})


def test_fsdp_shards_large_params_on_data_and_keeps_memory_replicated():
  mesh = sharding.make_mesh({"data": -1})
  state = {"params": {"big": jax.ShapeDtypeStruct((512, 64), jnp.float32),
                      "small": jax.ShapeDtypeStruct((8,), jnp.float32),
                      "odd": jax.ShapeDtypeStruct((129, 131), jnp.float32)},
           "opt": {"mu": jax.ShapeDtypeStruct((512, 64), jnp.float32)},
           "memory": {"embeddings": jax.ShapeDtypeStruct((4096, 64), jnp.float32)},
           "loss_params": {"loss": {"proxies": jax.ShapeDtypeStruct((100_000, 63), jnp.float32)}}}
  got = sharding.state_shardings(state, mesh, "fsdp")
  assert got["params"]["big"].spec == P("data", None)
  assert got["opt"]["mu"].spec == P("data", None)
  assert got["params"]["small"].spec == P() and got["params"]["odd"].spec == P()
  assert got["memory"]["embeddings"].spec == P()
  assert got["loss_params"]["loss"]["proxies"].spec == P("data", None)  # the class axis
  replicated = sharding.state_shardings(state, mesh, "replicated")
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))
  ruled = sharding.state_shardings(state, mesh, rules=[(r"params/big", (None, "data"))])
  assert ruled["params"]["big"].spec == P(None, "data")
  with pytest.raises(ValueError, match="'replicated' or 'fsdp'"):
    sharding.state_shardings(state, mesh, "zero3")


def test_device_prefetch_keeps_the_order_and_runs_ahead():
  """Batches come out in order as global arrays; when batch k is handed out,
  batches up to k + ahead have already been read and put on the devices."""
  mesh = sharding.make_mesh({"data": -1}, jax.devices())
  read = []

  def local():
    for k in range(6):
      read.append(k)
      yield {"x": np.full((8, 2), k, np.float32)}

  out = []
  for batch in sharding.prefetch_to_devices(local(), mesh, ahead=2):
    out.append(int(batch["x"][0, 0]))
    assert len(read) == min(6, out[-1] + 3)
    assert batch["x"].sharding.spec == sharding.batch_sharding(mesh).spec
  assert out == list(range(6))
  assert [int(b["x"][0, 0]) for b in sharding.prefetch_to_devices(
      ({"x": np.full((8, 2), k, np.float32)} for k in range(3)), mesh, ahead=0)] == [0, 1, 2]
