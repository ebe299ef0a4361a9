"""`model.init_file`: ImageNet weights (torchvision layout) or another run's workdir."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import models, train
from test_train import evaluation
from jaxdml.models import torch_import
from test_teacher import load_config, saved_state


def _as_torch_state_dict(variables):
  """Flax variables in torchvision's key names and layouts (inverse of the import)."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(variables).items():
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[torch_import.torch_key(path)] = value
  return out


def test_init_file_loads_the_backbone_and_the_teacher_copies_it(tmp_path):
  imagenet = models.get("resnet_tiny", num_classes=10).init(
      jax.random.key(5), jnp.zeros((1, 32, 32, 3)), train=False)
  np.savez(tmp_path / "w.npz", **_as_torch_state_dict(imagenet))
  config = load_config("cub_obdsd.py")
  config.model.init_file = str(tmp_path / "w.npz")
  config.total_steps = 1
  evaluation(config, False)
  parts, ckpt = train.setup(config, str(tmp_path / "run"))
  state = train.restore_or_create(parts, ckpt)
  ckpt.close()
  np.testing.assert_array_equal(state["params"]["conv1"]["kernel"],
                                imagenet["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(state["batch_stats"]["bn1"]["var"],
                                imagenet["batch_stats"]["bn1"]["var"])
  assert "fc" not in state["params"] and "embed_head" in state["params"]
  jax.tree.map(np.testing.assert_array_equal, state["teacher"]["params"], state["params"])
  config.model.init_file = str(tmp_path / "missing.npz")
  with pytest.raises((FileNotFoundError, ValueError), match="missing.npz"):
    train.setup(config, str(tmp_path / "again"))[0].create_state()


def test_init_file_may_be_another_runs_workdir(tmp_path):
  config = load_config("cub_obdsd.py", "smoke,distill=False")
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path / "pretrained"))
  config.model.init_file = str(tmp_path / "pretrained")
  parts, ckpt = train.setup(config, str(tmp_path / "finetune"))
  state = train.restore_or_create(parts, ckpt)
  ckpt.close()
  want = saved_state(str(tmp_path / "pretrained"), config)
  jax.tree.map(np.testing.assert_array_equal, dict(state["params"]), want["params"])
  jax.tree.map(np.testing.assert_array_equal, dict(state["batch_stats"]), want["batch_stats"])
  assert int(state["step"]) == 0
  os.makedirs(tmp_path / "nothing")
  config.model.init_file = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="without checkpoints"):
    train.setup(config, str(tmp_path / "again"))[0].create_state()
