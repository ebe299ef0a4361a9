"""Teachers in the train state: frozen runs, previous epochs, momentum encoders."""

import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdml import checkpoint, data, metrics_writer, models, teacher, train
from jaxdml import config as config_lib
from test_train import evaluation
from jaxdml.models import torch_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="smoke"):
  return config_lib.load_config(os.path.join(ROOT, "configs", name), arg)


def saved_state(workdir, config):
  parts, ckpt = train.setup(config, workdir)
  state = train.restore_or_create(parts, ckpt)
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state))


def test_frozen_teacher_is_the_teachers_checkpoint_and_never_moves(tmp_path):
  teacher_config = load_config("sketchy_rtl.py")
  teacher_config.total_steps = 2
  evaluation(teacher_config, False)
  train.train_and_evaluate(teacher_config, str(tmp_path / "teacher"))
  config = load_config("sketchy_rtl_kd.py")
  config.teacher.workdir = str(tmp_path / "teacher")
  config.total_steps = 3
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path / "student"))
  want = saved_state(str(tmp_path / "teacher"), teacher_config)
  got = saved_state(str(tmp_path / "student"), config)["teacher"]
  assert set(got) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])
  jax.tree.map(np.testing.assert_array_equal, got["batch_stats"], want["batch_stats"])
  # The student is a ShuffleNet pair, the teacher the ResNet pair it was saved as.
  student = saved_state(str(tmp_path / "student"), config)["params"]
  assert jax.tree.structure(student) != jax.tree.structure(got["params"])
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path / "student")) if "loss" in r]
  assert all(r["distill/embedding_distill"] > 0 for r in rows)
  # The teacher lives in the student's checkpoint: with its model given, the
  # student restores without the teacher's workdir.
  config.teacher.workdir = str(tmp_path / "deleted")
  config.teacher.model = teacher_config.model.to_dict()
  again = saved_state(str(tmp_path / "student"), config)["teacher"]
  jax.tree.map(np.testing.assert_array_equal, again["params"], want["params"])


def test_frozen_teacher_without_a_workdir_names_the_command(tmp_path):
  config = load_config("sketchy_rtl_kd.py")
  with pytest.raises(ValueError, match=r"--config=sketchy_rtl:smoke.*--config\.teacher\.workdir"):
    train.train_and_evaluate(config, str(tmp_path))
  config.teacher.workdir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def _teacher(kind, epoch_steps=0, **kwargs):
  return teacher.build(teacher.teacher_config(kind, **kwargs), student_model=None,
                       image_size=32, epoch_steps=epoch_steps)


def test_previous_epoch_teacher_copies_the_student_at_the_end_of_each_epoch():
  kind = _teacher("previous_epoch", epoch_steps=3)
  old, new = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  for step, refreshed in ((0, False), (1, False), (2, True), (5, True), (6, False)):
    got = kind.update(old, new, jnp.asarray(step), None)
    np.testing.assert_array_equal(got["w"], new["w"] if refreshed else old["w"])


def test_momentum_teacher_is_an_exponential_moving_average():
  kind = _teacher("momentum", momentum=0.9)
  got = kind.update({"w": jnp.full(2, 10.0)}, {"w": jnp.zeros(2)}, jnp.asarray(0), None)
  np.testing.assert_allclose(got["w"], 9.0)


def test_previous_epoch_teacher_in_a_run_is_the_student_after_each_epoch(tmp_path):
  config = load_config("cub_obdsd.py")  # smoke: epochs of one step
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path))
  state = saved_state(str(tmp_path), config)
  jax.tree.map(np.testing.assert_array_equal, state["teacher"]["params"], state["params"])
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path)) if "loss" in r]
  # progress is 0 in the first epoch, so the OBD-SD term starts at exactly 0.
  assert rows[0]["distill/obd_sd"] == 0.0 and rows[1]["distill/obd_sd"] > 0.0


def test_momentum_teacher_fills_the_memory_with_its_own_embeddings(tmp_path):
  config = load_config("inshop_irt.py")  # In-Shop: 0.999 momentum encoder feeds the memory
  assert config.teacher.kind == "momentum" and config.teacher.feeds_memory
  config.teacher.momentum = 1.0  # the teacher stays the initial weights: checkable
  config.total_steps = 1
  evaluation(config, False)
  parts, _ = train.setup(config, str(tmp_path / "unused"))
  model = parts.model
  initial = parts.create_state()
  initial = jax.device_get(initial)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  state = saved_state(str(tmp_path / "run"), config)
  jax.tree.map(np.testing.assert_array_equal, state["teacher"]["params"], initial["params"])
  batch = next(data.train_batches(config.data, seed=int(config.seed),
                                  global_batch_size=int(config.batch_size), start_step=0,
                                  task=config.task))
  keys, _ = model.apply(initial["teacher"], data.normalize(batch["image"]), train=False)
  memory = state["memory"]
  assert memory["valid"].sum() == config.batch_size
  np.testing.assert_allclose(memory["embeddings"][:config.batch_size], keys, atol=1e-5)
  np.testing.assert_array_equal(memory["labels"][:config.batch_size], batch["label"])
  # The student moved; its own embeddings of the batch are not what was stored.
  student, _ = model.apply({"params": state["params"]}, data.normalize(batch["image"]))
  assert np.max(np.abs(np.asarray(student) - np.asarray(keys))) > 1e-3


def test_asymmetric_evaluation_equals_symmetric_when_the_teacher_is_the_student(tmp_path):
  config = load_config("cub_raml.py")
  # The teacher follows the student step by step and sees the same pixels.
  config.teacher = teacher.teacher_config("previous_epoch", images="image_hi")
  config.epoch_steps = 1
  config.data.views = dict(num=2, hi=16, lo=16, mixup=0.2)
  results = train.train_and_evaluate(config, str(tmp_path))
  sym = {k: v for k, v in results.items() if not k.startswith("asym/")}
  assert sym and {f"asym/{k}" for k in sym} <= set(results)
  for k, v in sym.items():
    assert results[f"asym/{k}"] == pytest.approx(v, abs=1e-6), k




class CentredEma(teacher.Teacher):
  """A DINO-style kind from outside the package: an EMA of the student whose
  outputs are centred by a running mean it keeps in its own state."""

  FIELDS = {"momentum": 0.9, "center_momentum": 0.5}

  def init(self, student_variables, dummy_inputs):
    out, _ = jax.eval_shape(lambda: self.model.apply(student_variables, *dummy_inputs))
    return {"variables": jax.tree.map(jnp.copy, student_variables),
            "center": jnp.zeros(out.shape[-1], jnp.float32)}

  def restore(self, subtree, student_variables, shardings):
    return dict(subtree, variables=jax.tree.map(jnp.copy, student_variables))

  def variables(self, subtree):
    return subtree["variables"]

  def apply(self, subtree, inputs):
    return super().apply(subtree, inputs) - subtree["center"]

  def update(self, subtree, student_variables, step, outputs):
    m, c = float(self.cfg.momentum), float(self.cfg.center_momentum)
    uncentred = outputs + subtree["center"]
    return {"variables": jax.tree.map(lambda t, s: m * t + (1 - m) * s, subtree["variables"],
                                      student_variables),
            "center": c * subtree["center"] + (1 - c) * jnp.mean(uncentred, 0)}


def test_a_new_teacher_kind_with_its_own_state_needs_no_change_elsewhere(tmp_path, monkeypatch):
  # Registered for this test only: other tests list the kinds.
  monkeypatch.setattr(teacher, "_KINDS", dict(teacher._KINDS))
  teacher.register("test_centred_ema")(CentredEma)
  config = load_config("cub_obdsd.py")
  config.teacher = teacher.teacher_config("test_centred_ema", center_momentum=0.0)
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path))
  state = saved_state(str(tmp_path), config)
  assert set(state["teacher"]) == {"variables", "center"}
  # center_momentum 0: the centre is the last batch's mean teacher output,
  # computed from the EMA weights it had at that step (not the saved ones).
  center = state["teacher"]["center"]
  assert center.shape == (config.model.embed_dim,) and np.all(np.isfinite(center))
  assert np.linalg.norm(center) > 0.1  # L2 embeddings of one batch do not cancel
  teacher_kernel = state["teacher"]["variables"]["params"]["conv1"]["kernel"]
  assert not np.allclose(teacher_kernel, state["params"]["conv1"]["kernel"])
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path)) if "loss" in r]
  assert rows[1]["distill/obd_sd"] > 0.0
  config.teacher.bogus = 1
  with pytest.raises(ValueError, match="'test_centred_ema' teacher takes no field"):
    train.train_and_evaluate(config, str(tmp_path / "again"))
