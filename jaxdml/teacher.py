"""Teachers for distillation: one registered object per kind.

A kind (`config.teacher.kind`) is a `Teacher` subclass registered by name.
It owns the train state's `"teacher"` subtree: what it holds, how it is
made (`init`, inside the jitted init; `restore`, on the host once the
student's own init files are loaded), moved after each step (`update`) and
applied (`apply`). The train step, the sharding, the evaluator and export
see only that interface, so a kind with state of its own (a DINO-style
centre, say) is one new class here and nothing else.

Kinds:
- `frozen`: a trained run's weights (SBIR knowledge distillation, RAML).
  `workdir` names that run; its latest checkpoint's `params` and
  `batch_stats` (or those of `step`) are read once, when a fresh run creates
  its state, and are then part of the student's checkpoints. The teacher's
  architecture is read from that checkpoint's metadata, or from `model` when
  set (a resumed run whose teacher's workdir is gone).
- `previous_epoch`: the student's own weights, copied every
  `config.epoch_steps` steps (OBD-SD's progressive self-distillation).
- `momentum`: an exponential moving average of the student's weights
  (`momentum`, 0.999 for IRT on In-Shop).

Every kind takes `images` (`"same"` as the student, or `"image_hi"`, RAML's
high-resolution views) and `feeds_memory` (its embeddings fill the
cross-batch memory instead of the student's, MoCo-style). The teacher runs
in inference mode under `stop_gradient`. Distillation terms that use it are
`config.terms` entries whose loss consumes "teacher" (jaxdml.losses).
"""

from __future__ import annotations

import difflib
import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxdml import checkpoint as checkpoint_lib
from jaxdml import models, paths, pretrained

# Fields every kind takes, with their defaults.
COMMON_FIELDS = {"kind": None, "images": "same", "feeds_memory": False}
IMAGES = ("same", "image_hi")


class Teacher:
  """One kind of teacher; subclasses set `FIELDS` (their own config fields)."""

  FIELDS: dict = {}

  def __init__(self, config, student_model):
    self.config = config
    self.cfg = config.teacher
    self.model = self.build_model(student_model)

  @classmethod
  def check(cls, config) -> None:
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
    if self.images == "image_hi":
      return int(self.config.data.views["hi"])
    return int(self.config.data.image_size)

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


_KINDS: dict[str, type[Teacher]] = {}


def register(name: str):
  """Class decorator: registers a Teacher subclass as kind `name`."""
  def add(cls):
    if name in _KINDS:
      raise ValueError(f"teacher kind {name!r} is already registered; pick another name.")
    if not issubclass(cls, Teacher):
      raise ValueError(f"teacher kind {name!r}: {cls} must subclass jaxdml.teacher.Teacher.")
    _KINDS[name] = cls
    return cls
  return add


def kinds() -> tuple:
  return tuple(sorted(_KINDS))


def _kind(name) -> type[Teacher]:
  if name not in _KINDS:
    raise ValueError(f"config.teacher.kind={name!r}: expected one of {kinds()} "
                     "(jaxdml.teacher.register adds a kind).")
  return _KINDS[name]


def fields(kind: str) -> dict:
  """Every field of a `config.teacher` of this kind, with its default (a
  type: unset, of that type)."""
  return {**COMMON_FIELDS, **_kind(kind).FIELDS}


def teacher_config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """A `config.teacher` with every field of `kind`, so `--config.teacher.X=` works."""
  _check_fields(kind, overrides)
  # A type as default: an unset field of that type (None until given).
  c = ml_collections.ConfigDict({
      k: ml_collections.config_dict.placeholder(d) if isinstance(d, type) else d
      for k, d in fields(kind).items()})
  c.kind = kind
  for key, value in overrides.items():
    c[key] = value
  return c


def _check_fields(kind: str, given) -> None:
  known = fields(kind)
  unknown = [k for k in given if k not in known]
  if unknown:
    close = difflib.get_close_matches(unknown[0], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config.teacher: a {kind!r} teacher takes no field(s) {unknown}{hint}; "
                     f"its fields: {sorted(known)}.")


def uses_teacher(config) -> bool:
  return config.get("teacher") is not None and bool(config.teacher.get("kind"))


def validate(config) -> None:
  """Config validation: the kind exists, takes every field given, can run."""
  if not uses_teacher(config):
    return
  kind = config.teacher.kind
  _check_fields(kind, list(config.teacher.keys()))
  if config.teacher.get("images", "same") not in IMAGES:
    raise ValueError(f"config.teacher.images={config.teacher.images!r}: expected one of {IMAGES}.")
  _kind(kind).check(config)


def build(config, student_model) -> Teacher | None:
  """The config's teacher object, or None without a teacher."""
  if not uses_teacher(config):
    return None
  validate(config)
  return _kind(config.teacher.kind)(config, student_model)


@register("frozen")
class Frozen(Teacher):
  """A trained run's weights, read once and then part of this run's checkpoints."""

  FIELDS = {"workdir": str, "step": int, "recipe": "", "model": None}

  def build_model(self, student_model):
    saved = self.cfg.get("model") or dict(_read_saved_model(
        self.cfg.get("workdir"), self.cfg.get("step"), self.cfg.get("recipe") or ""))
    # The teacher computes in the student's dtype (its parameters stay float32):
    # "auto" in the student's config means bfloat16 for both on an accelerator.
    description = models.with_dtype(pretrained.model_kwargs(saved), models.dtype_of(student_model))
    return models.get(description.pop("name"), **description)

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


@register("previous_epoch")
class PreviousEpoch(Teacher):
  """The student as it was at the end of the previous epoch."""

  @classmethod
  def check(cls, config) -> None:
    if int(config.get("epoch_steps", 0) or 0) <= 0:
      raise ValueError("a previous_epoch teacher needs config.epoch_steps > 0 (the steps "
                       "in one epoch).")

  def update(self, subtree, student_variables, step, outputs):
    refresh = (step + 1) % int(self.config.epoch_steps) == 0
    return jax.tree.map(lambda t, s: jnp.where(refresh, s.astype(t.dtype), t),
                        subtree, student_variables)


@register("momentum")
class Momentum(Teacher):
  """An exponential moving average of the student's weights."""

  FIELDS = {"momentum": 0.999}

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
  paths.check_reachable(workdir, "config.teacher.workdir")
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, create=False)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise FileNotFoundError(
        f"config.teacher.workdir={workdir!r} has no checkpoint under "
        f"{ckpt.directory}; {hint}.")
  return ckpt


@functools.lru_cache(maxsize=8)
def _read_saved_model(workdir, step, recipe):
  # Read once per run even if the teacher is built more than once.
  ckpt = _frozen_checkpointer(workdir, recipe)
  try:
    return ckpt.meta(step)["model"]
  finally:
    ckpt.close()
