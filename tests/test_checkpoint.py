"""Checkpoints: model fingerprint, subset restore."""

import jax
import numpy as np
import pytest

from jaxdml import checkpoint, train
from test_train import evaluation
from test_teacher import load_config, saved_state


def test_workdir_of_another_model_is_refused(tmp_path):
  config = load_config("sketchy_rtl.py")
  config.total_steps = 1
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path))
  other = load_config("sketchy_rtl.py")
  other.model.query.embed_dim = 24
  other.model.gallery.embed_dim = 24
  with pytest.raises(ValueError, match="belongs to another model"):
    train.train_and_evaluate(other, str(tmp_path))


def test_checkpoint_subset_restore_reads_only_what_is_asked(tmp_path):
  config = load_config("sketchy_rtl.py")
  config.total_steps = 1
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  full = saved_state(str(tmp_path), config)
  shardings = {"params": jax.tree.map(lambda _: one, full["params"])}
  got = ckpt.restore_subset(shardings)
  assert set(got) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, got["params"], full["params"])
  with pytest.raises(ValueError, match=r"has no \['nothing'\]"):
    ckpt.restore_subset({"nothing": one})
  ckpt.close()
