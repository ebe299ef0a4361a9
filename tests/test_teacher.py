"""Teachers in the train state: frozen runs, previous epochs, momentum encoders."""

import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdml import checkpoint, config_lib, data, metrics_writer, models, teacher, train
from jaxdml.models import torch_import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="smoke"):
  return config_lib.load_config(os.path.join(ROOT, "configs", name), arg)


def saved_state(workdir, config):
  mesh, model, tx, _, ckpt = train.setup(config, workdir)
  state, _ = train.restore_or_create(config, model, tx, mesh, ckpt)
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state))


def test_frozen_teacher_is_the_teachers_checkpoint_and_never_moves(tmp_path):
  teacher_config = load_config("sketchy_rtl.py")
  teacher_config.total_steps = 2
  teacher_config.eval.enabled = False
  train.train_and_evaluate(teacher_config, str(tmp_path / "teacher"))
  config = load_config("sketchy_rtl_kd.py")
  config.teacher.workdir = str(tmp_path / "teacher")
  config.total_steps = 3
  config.eval.enabled = False
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
  with pytest.raises(ValueError, match=r"configs/sketchy_rtl\.py:smoke.*--config\.teacher\.workdir"):
    train.train_and_evaluate(config, str(tmp_path))
  config.teacher.workdir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def _teacher_config(**kwargs):
  c = ml_collections.ConfigDict(dict(total_steps=10))
  c.teacher = teacher.teacher_config(**kwargs)
  return c


def test_previous_epoch_teacher_copies_the_student_at_the_end_of_each_epoch():
  config = _teacher_config(kind="previous_epoch", epoch_steps=3)
  old, new = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  for step, refreshed in ((0, False), (1, False), (2, True), (5, True), (6, False)):
    got = teacher.update(config, old, new, jnp.asarray(step))
    np.testing.assert_array_equal(got["w"], new["w"] if refreshed else old["w"])


def test_momentum_teacher_is_an_exponential_moving_average():
  config = _teacher_config(kind="momentum", momentum=0.9)
  got = teacher.update(config, {"w": jnp.full(2, 10.0)}, {"w": jnp.zeros(2)}, jnp.asarray(0))
  np.testing.assert_allclose(got["w"], 9.0)


def test_obd_sd_progress_is_epoch_over_epochs():
  config = _teacher_config(kind="previous_epoch", epoch_steps=3)  # 10 steps: 3 epochs
  got = [float(teacher.progress(config, jnp.asarray(s))) for s in (0, 2, 3, 6, 9)]
  np.testing.assert_allclose(got, [0, 0, 1 / 3, 2 / 3, 1])


def test_previous_epoch_teacher_in_a_run_is_the_student_after_each_epoch(tmp_path):
  config = load_config("cub_obdsd.py")  # smoke: epochs of one step
  config.eval.enabled = False
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
  config.eval.enabled = False
  mesh, model, tx, _, _ = train.setup(config, str(tmp_path / "unused"))
  initial, _ = train.create_train_state(config, model, tx, mesh)
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
  config.teacher = teacher.teacher_config("previous_epoch", epoch_steps=1, images="image_hi")
  config.data.views = dict(num=2, hi=16, lo=16, mixup=0.2)
  results = train.train_and_evaluate(config, str(tmp_path))
  sym = {k: v for k, v in results.items() if not k.startswith("asym/")}
  assert sym and {f"asym/{k}" for k in sym} <= set(results)
  for k, v in sym.items():
    assert results[f"asym/{k}"] == pytest.approx(v, abs=1e-6), k


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
  config.eval.enabled = False
  mesh, model, tx, _, ckpt = train.setup(config, str(tmp_path / "run"))
  state, _ = train.restore_or_create(config, model, tx, mesh, ckpt)
  ckpt.close()
  np.testing.assert_array_equal(state["params"]["conv1"]["kernel"],
                                imagenet["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(state["batch_stats"]["bn1"]["var"],
                                imagenet["batch_stats"]["bn1"]["var"])
  assert "fc" not in state["params"] and "embed_head" in state["params"]
  jax.tree.map(np.testing.assert_array_equal, state["teacher"]["params"], state["params"])
  config.model.init_file = str(tmp_path / "missing.npz")
  with pytest.raises((FileNotFoundError, ValueError), match="missing.npz"):
    train.create_train_state(config, model, tx, mesh)


def test_init_file_may_be_another_runs_workdir(tmp_path):
  config = load_config("cub_obdsd.py", "smoke,distill=False")
  config.eval.enabled = False
  train.train_and_evaluate(config, str(tmp_path / "pretrained"))
  config.model.init_file = str(tmp_path / "pretrained")
  mesh, model, tx, _, ckpt = train.setup(config, str(tmp_path / "finetune"))
  state, _ = train.restore_or_create(config, model, tx, mesh, ckpt)
  ckpt.close()
  want = saved_state(str(tmp_path / "pretrained"), config)
  jax.tree.map(np.testing.assert_array_equal, dict(state["params"]), want["params"])
  jax.tree.map(np.testing.assert_array_equal, dict(state["batch_stats"]), want["batch_stats"])
  assert int(state["step"]) == 0
  os.makedirs(tmp_path / "nothing")
  config.model.init_file = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="without checkpoints"):
    train.create_train_state(config, model, tx, mesh)


def test_checkpoint_subset_restore_reads_only_what_is_asked(tmp_path):
  config = load_config("sketchy_rtl.py")
  config.total_steps = 1
  config.eval.enabled = False
  train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), create=False)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  full = saved_state(str(tmp_path), config)
  shardings = {"params": jax.tree.map(lambda _: one, full["params"])}
  got = ckpt.restore_subset(shardings)
  assert set(got) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, got["params"], full["params"])
  with pytest.raises(ValueError, match=r"has no \['nothing'\]"):
    ckpt.restore_subset({"nothing": one})
  ckpt.close()
