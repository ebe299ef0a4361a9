"""The build layer: one set of parts per run, one embed function per tower."""

import jax
import numpy as np
import pytest

from jaxdml import build, data, teacher
from test_train import load_config


def _images(rng, n, size):
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_embed_fns_are_the_towers_of_the_model_on_the_states_variables():
  config = load_config("sketchy_rtl.py")
  parts = build.build(config)
  state = parts.create_state()
  fns = parts.embed_fns(state)
  assert set(fns) == {"query", "gallery"}
  images = _images(np.random.default_rng(0), 8, int(config.data.image_size))
  variables = build.model_variables(state)
  outputs = {}
  for tower, method in (("query", "embed_query"), ("gallery", "embed_gallery")):
    want, _ = parts.model.apply(variables, data.normalize(images), train=False, method=method)
    outputs[tower] = np.asarray(fns[tower](images))
    np.testing.assert_allclose(outputs[tower], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs["query"], outputs["gallery"])  # two towers, two weights


def test_build_resolves_a_copy_and_lays_the_state_out_as_the_target_says():
  config = load_config("sop_xbn.py")
  assert "epoch_steps" in config and "keep_checkpoints" in config
  del config["keep_checkpoints"]
  parts = build.build(config)
  assert parts.config.keep_checkpoints == 3 and "keep_checkpoints" not in config
  target = parts.restore_target()
  for t, a, s in zip(jax.tree.leaves(target), jax.tree.leaves(parts.abstract),
                     jax.tree.leaves(parts.shardings)):
    assert (t.shape, t.dtype, t.sharding) == (a.shape, a.dtype, s)
  assert target["memory"]["embeddings"].shape == (int(config.memory.size), 16)
  assert parts.mesh.devices.size == len(jax.devices())
  one = build.build(config, devices=jax.devices()[:1])
  assert one.mesh.devices.size == 1


def test_a_teacher_tower_embeds_with_the_teachers_own_variables():
  config = load_config("cub_raml.py")
  config.teacher = teacher.teacher_config("momentum", images="image_hi", momentum=0.5)
  parts = build.build(config)
  state = parts.create_state()
  state["teacher"] = jax.tree.map(lambda x: x * 0.5, state["teacher"])
  fns = parts.embed_fns(state)
  assert set(fns) == {"query", "gallery", "teacher"}
  images = _images(np.random.default_rng(1), 8, int(config.data.views["hi"]))
  want, _ = parts.model.apply(state["teacher"], data.normalize(images), train=False)
  np.testing.assert_allclose(fns["teacher"](images), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(fns["teacher"](images), fns["query"](images), rtol=1e-3)


class _Unreadable:
  """A config that fails on any read: what the step must never touch."""

  def __getattr__(self, name):
    raise AssertionError(f"the train step read config.{name}")

  def __getitem__(self, name):
    raise AssertionError(f"the train step read config[{name!r}]")

  def get(self, name, default=None):
    raise AssertionError(f"the train step read config.get({name!r})")


def test_the_train_step_is_built_from_the_parts_alone():
  """With the parts' config made unreadable, the step builds, runs and
  takes the same step as the one built from the untouched parts."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxdml import sharding, train  # pylint: disable=g-import-not-at-top
  config = load_config("sop_xbn.py", "smoke,adapt=kalman")  # memory, adapted: the most parts
  parts = build.build(config)
  batch = next(parts.train_batches(0))
  global_batch = lambda: sharding.global_batch(batch, parts.mesh)
  want, want_metrics = train.make_train_step(parts)(parts.create_state(), global_batch())
  blind = dataclasses.replace(parts, config=_Unreadable())
  got, metrics = train.make_train_step(blind)(blind.create_state(), global_batch())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  assert float(metrics["loss"]) == float(want_metrics["loss"]) and "memory_fill" in metrics
