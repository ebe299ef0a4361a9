"""The built-in teacher kinds and the `Teacher` interface every kind implements.

See `jaxdml.teacher` for the registry and what each kind is for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdml import checkpoint as checkpoint_lib
from jaxdml import models, paths, pretrained
from jaxdml.config import defaults


class Teacher:
  """One kind of teacher; subclasses set `FIELDS` (their own config fields).

  Built from its own settings (`config.teacher`), the student's model, the
  image size it sees and the steps in an epoch: never the whole config.
  """

  FIELDS: dict = {}

  def __init__(self, settings, student_model, *, image_size: int, epoch_steps: int = 0):
    self.cfg = settings
    self._image_size = int(image_size)
    self.epoch_steps = int(epoch_steps)
    self.model = self.build_model(student_model)

  @classmethod
  def check(cls, settings, config) -> None:
    """Raises ValueError for a config this kind cannot run (at validation)."""

  def build_model(self, student_model):
    return student_model

  @property
  def feeds_memory(self) -> bool:
    return bool(self.cfg.feeds_memory)

  @property
  def images(self) -> str:
    return self.cfg.images

  def image_size(self) -> int:
    """The teacher's input resolution (RAML: the high-resolution views)."""
    return self._image_size

  def describe_model(self) -> dict | None:
    """The teacher's architecture (`models.get` keywords), kept in the
    student's checkpoints so its tower can be rebuilt without this teacher's
    sources (a frozen teacher's workdir); None: the student's own."""
    return None

  def init(self, student_variables, dummy_inputs) -> dict:
    """The teacher's subtree of a fresh state (inside the jitted init)."""
    return jax.tree.map(jnp.copy, student_variables)

  def restore(self, subtree, student_variables, shardings) -> dict:
    """The subtree once the student's init files are loaded (host side)."""
    del subtree, shardings
    return jax.tree.map(jnp.copy, student_variables)

  def variables(self, subtree) -> dict:
    """The Flax variables `apply` runs the teacher's model with."""
    return subtree

  def apply(self, subtree, inputs: tuple):
    """The teacher's outputs on the model inputs, without gradient."""
    out, _ = self.model.apply(self.variables(subtree), *inputs, train=False)
    return jax.lax.stop_gradient(out)

  def update(self, subtree, student_variables, step, outputs):
    """The subtree after the student's update at `step` (jit-safe);
    `outputs` are what `apply` gave on this step's batch."""
    raise NotImplementedError


class Frozen(Teacher):
  """A trained run's weights, read once and then part of this run's checkpoints."""

  FIELDS = defaults.TEACHER_KINDS["frozen"]

  def build_model(self, student_model):
    self._saved = pretrained.model_kwargs(self.cfg.get("model") or dict(saved_model(
        self.cfg.get("workdir"), self.cfg.get("step"), self.cfg.get("recipe") or "")))
    # The teacher computes in the student's dtype (its parameters stay float32):
    # "auto" in the student's config means bfloat16 for both on an accelerator.
    description = models.with_dtype(self._saved, models.dtype_of(student_model))
    return models.get(description.pop("name"), **description)

  def describe_model(self) -> dict:
    return dict(self._saved)

  def init(self, student_variables, dummy_inputs) -> dict:
    # Zeros of the right shapes: `restore` fills them after init, so the run
    # never compiles the teacher's initialisers.
    shapes = jax.eval_shape(lambda: self.model.init(jax.random.key(0), *dummy_inputs))
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def restore(self, subtree, student_variables, shardings) -> dict:
    ckpt = _frozen_checkpointer(self.cfg.get("workdir"), self.cfg.get("recipe") or "")
    try:
      return ckpt.restore_subset(shardings, self.cfg.get("step"))
    finally:
      ckpt.close()

  def update(self, subtree, student_variables, step, outputs):
    return subtree


class PreviousEpoch(Teacher):
  """The student as it was at the end of the previous epoch."""

  def update(self, subtree, student_variables, step, outputs):
    refresh = (step + 1) % self.epoch_steps == 0
    return jax.tree.map(lambda t, s: jnp.where(refresh, s.astype(t.dtype), t),
                        subtree, student_variables)


class Momentum(Teacher):
  """An exponential moving average of the student's weights."""

  FIELDS = defaults.TEACHER_KINDS["momentum"]

  def update(self, subtree, student_variables, step, outputs):
    m = float(self.cfg.momentum)
    return jax.tree.map(lambda t, s: m * t + (1.0 - m) * s.astype(t.dtype),
                        subtree, student_variables)


def _frozen_checkpointer(workdir: str | None, recipe: str) -> checkpoint_lib.Checkpointer:
  """The frozen teacher's checkpoints; errors say how to train the teacher."""
  hint = (f"train it first, e.g. python -m jaxdml.main --config={recipe} "
          "--workdir=TEACHER_DIR, then pass --config.teacher.workdir=TEACHER_DIR"
          if recipe else "pass --config.teacher.workdir=TEACHER_DIR "
          "(a trained run's --workdir)")
  if not workdir:
    raise ValueError(f"config.teacher.workdir is not set: this recipe distils a trained "
                     f"teacher; {hint}.")
  paths.check_reachable(workdir, "config.teacher.workdir", folder=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise FileNotFoundError(
        f"config.teacher.workdir={workdir!r} has no checkpoint under "
        f"{ckpt.directory}; {hint}.")
  return ckpt


@functools.lru_cache(maxsize=8)
def saved_model(workdir, step, recipe):
  """The `config.model` a trained run's checkpoint (its latest, or `step`)
  was saved with; read once per run even if asked more than once."""
  ckpt = _frozen_checkpointer(workdir, recipe)
  try:
    return ckpt.meta(step)["model"]
  finally:
    ckpt.close()
