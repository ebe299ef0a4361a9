"""Teachers for distillation, kept in the train state under `"teacher"`.

Three kinds (`config.teacher.kind`), one code path in the train step:
- `frozen`: a trained run's weights (SBIR knowledge distillation, RAML).
  `config.teacher.workdir` names that run; its latest checkpoint's `params`
  and `batch_stats` (or those of `teacher.step`) are read once, when a fresh
  run creates its state, and are then part of the student's checkpoints.
  The teacher's architecture is read from that checkpoint's metadata, or
  from `teacher.model` when set (a resumed run whose teacher's workdir is
  gone).
- `previous_epoch`: the student's own weights, copied every `epoch_steps`
  steps (OBD-SD's progressive self-distillation).
- `momentum`: an exponential moving average of the student's weights
  (`momentum`, 0.999 for IRT on In-Shop); with `feeds_memory` its embeddings
  fill the cross-batch memory instead of the student's (MoCo-style).

The teacher runs in inference mode (`train=False`, BatchNorm on its running
statistics) under `stop_gradient`. `images` says which batch images it sees:
`"same"` as the student, or `"image_hi"` (RAML's high-resolution views).
`loss` is the distillation term, `{name, weight, **hparams}`, added to the
recipe's loss; `None` for a teacher that only feeds the memory.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from jaxdml import checkpoint as checkpoint_lib
from jaxdml import models, pretrained

KINDS = ("frozen", "previous_epoch", "momentum")


def teacher_config(kind: str, *, loss: dict | None = None, recipe: str = "",
                   images: str = "same", epoch_steps: int = 0, momentum: float = 0.999,
                   feeds_memory: bool = False) -> ml_collections.ConfigDict:
  """A `config.teacher` with every field, so `--config.teacher.X=` works."""
  if kind not in KINDS:
    raise ValueError(f"teacher kind {kind!r}: expected one of {KINDS}.")
  return ml_collections.ConfigDict(dict(
      kind=kind, workdir=ml_collections.config_dict.placeholder(str),
      step=ml_collections.config_dict.placeholder(int), recipe=recipe, images=images,
      epoch_steps=int(epoch_steps), momentum=float(momentum),
      feeds_memory=bool(feeds_memory), loss=loss, model=None))


def uses_teacher(config) -> bool:
  return config.get("teacher") is not None and bool(config.teacher.get("kind"))


def _frozen_checkpointer(workdir: str | None, recipe: str) -> checkpoint_lib.Checkpointer:
  """The frozen teacher's checkpoints; errors say how to train the teacher."""
  hint = (f"train it first, e.g. python -m jaxdml.main --config={recipe} "
          "--workdir=TEACHER_DIR, then pass --config.teacher.workdir=TEACHER_DIR"
          if recipe else "pass --config.teacher.workdir=TEACHER_DIR "
          "(a trained run's --workdir)")
  if not workdir:
    raise ValueError(f"config.teacher.workdir is not set: this recipe distils a trained "
                     f"teacher; {hint}.")
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, create=False)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise FileNotFoundError(
        f"config.teacher.workdir={workdir!r} has no checkpoint under "
        f"{os.path.join(workdir, 'checkpoints')}; {hint}.")
  return ckpt


def build_model(config, student_model):
  """The teacher's module: the student's own, or the frozen run's model."""
  if config.teacher.kind != "frozen":
    return student_model
  saved = config.teacher.get("model") or _saved_model(config)
  description = pretrained.model_kwargs(saved)
  return models.get(description.pop("name"), **description)


def _saved_model(config) -> dict:
  """The frozen run's model config, from its checkpoint's metadata."""
  cfg = config.teacher
  return dict(_read_saved_model(cfg.get("workdir"), cfg.get("step"), cfg.get("recipe") or ""))


@functools.lru_cache(maxsize=8)
def _read_saved_model(workdir, step, recipe):
  # Start-up builds the teacher for the state, the step and the evaluator:
  # the workdir is read once, not three times.
  ckpt = _frozen_checkpointer(workdir, recipe)
  try:
    return ckpt.meta(step)["model"]
  finally:
    ckpt.close()


def image_size(config) -> int:
  """The teacher's input resolution (RAML: the high-resolution views)."""
  if config.teacher.get("images", "same") == "image_hi":
    return int(config.data.views["hi"])
  return int(config.data.image_size)


def init_variables(config, teacher_model, student_variables, dummy_inputs):
  """The teacher slot of a fresh state, inside the jitted init.

  Frozen teachers get zeros of the right shapes here; `load_frozen` fills
  them after init, so the run never compiles the teacher's initialisers.
  """
  if config.teacher.kind != "frozen":
    return jax.tree.map(jnp.copy, student_variables)
  shapes = jax.eval_shape(lambda: teacher_model.init(jax.random.key(0), *dummy_inputs))
  shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def load_frozen(config, shardings: dict) -> dict:
  """The frozen teacher's variables from its workdir, laid out as `shardings`."""
  ckpt = _frozen_checkpointer(config.teacher.get("workdir"), config.teacher.get("recipe") or "")
  try:
    return ckpt.restore_subset(shardings, config.teacher.get("step"))
  finally:
    ckpt.close()


def update(config, teacher_variables: dict, student_variables: dict, step):
  """The teacher after the student's update at `step` (jit-safe)."""
  kind = config.teacher.kind
  if kind == "frozen":
    return teacher_variables
  if kind == "momentum":
    m = float(config.teacher.momentum)
    return jax.tree.map(lambda t, s: m * t + (1.0 - m) * s.astype(t.dtype),
                        teacher_variables, student_variables)
  epoch_steps = int(config.teacher.epoch_steps)
  if epoch_steps <= 0:
    raise ValueError("config.teacher.epoch_steps must be > 0 for a previous_epoch teacher "
                     "(the steps in one epoch).")
  refresh = (step + 1) % epoch_steps == 0
  return jax.tree.map(lambda t, s: jnp.where(refresh, s.astype(t.dtype), t),
                      teacher_variables, student_variables)


def progress(config, step):
  """epoch / epochs in [0, 1] (OBD-SD's ramp), from `teacher.epoch_steps`."""
  epoch_steps = int(config.teacher.get("epoch_steps", 0) or 0)
  if epoch_steps <= 0:
    raise ValueError("obd_sd needs config.teacher.epoch_steps (steps per epoch) for its "
                     "epoch / epochs ramp.")
  epochs = max(1, int(config.total_steps) // epoch_steps)
  return jnp.minimum(step // epoch_steps, epochs).astype(jnp.float32) / epochs
