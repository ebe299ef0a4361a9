"""Teachers for distillation: one registered class per kind.

A kind (`config.teacher.kind`) is a `Teacher` subclass registered by name.
It owns the train state's `"teacher"` subtree: what it holds, how it is
made (`init`, inside the jitted init; `restore`, on the host once the
student's own init files are loaded), moved after each step (`update`) and
applied (`apply`). The train step, the sharding, the evaluators and export
see only that interface, so a kind with state of its own (a DINO-style
centre, say) is one new class and nothing else.

Kinds (`jaxdml.teacher.builtin`):
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

This module is the registry and the config checks, and imports no JAX; the
classes live in `jaxdml.teacher.builtin`, imported when a teacher is built.
"""

from __future__ import annotations

import importlib

import ml_collections

from jaxdml.config import defaults

COMMON_FIELDS = defaults.TEACHER
IMAGES = defaults.TEACHER_IMAGES


def _needs_epoch_steps(settings, config) -> None:
  del settings
  if int(config.get("epoch_steps", 0) or 0) <= 0:
    raise ValueError("a previous_epoch teacher needs config.epoch_steps > 0 (the steps "
                     "in one epoch).")


# kind -> the class (a "module:attr" of jaxdml.teacher, loaded when built),
# its own fields and its check of the whole config (None: none).
_KINDS: dict[str, tuple] = {
    "frozen": ("builtin:Frozen", defaults.TEACHER_KINDS["frozen"], None),
    "previous_epoch": ("builtin:PreviousEpoch", defaults.TEACHER_KINDS["previous_epoch"],
                       _needs_epoch_steps),
    "momentum": ("builtin:Momentum", defaults.TEACHER_KINDS["momentum"], None),
}


def register(name: str):
  """Class decorator: registers a `Teacher` subclass as kind `name`; its
  `FIELDS` are its config fields beside the common ones, its classmethod
  `check(settings, config)` (optional) rejects configs it cannot run."""
  def add(cls):
    from jaxdml.teacher import builtin  # pylint: disable=g-import-not-at-top
    if name in _KINDS:
      raise ValueError(f"teacher kind {name!r} is already registered; pick another name.")
    if not issubclass(cls, builtin.Teacher):
      raise ValueError(f"teacher kind {name!r}: {cls} must subclass jaxdml.teacher.Teacher.")
    _KINDS[name] = (cls, dict(cls.FIELDS), cls.check)
    return cls
  return add


def kinds() -> tuple:
  return tuple(sorted(_KINDS))


def _kind(name) -> tuple:
  if name not in _KINDS:
    raise ValueError(f"config.teacher.kind={name!r}: expected one of {kinds()} "
                     "(jaxdml.teacher.register adds a kind).")
  return _KINDS[name]


def fields(kind: str) -> dict:
  """Every field of a `config.teacher` of this kind, with its default (a
  type: unset, of that type)."""
  return {**COMMON_FIELDS, **_kind(kind)[1]}


def teacher_config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """A `config.teacher` with every field of `kind`, so `--config.teacher.X=` works."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  _check_fields(kind, overrides)
  c = config_lib.config_dict(fields(kind))
  c.kind = kind
  for key, value in overrides.items():
    c[key] = value
  return c


def _check_fields(kind: str, given) -> None:
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  known = fields(kind)
  unknown = [k for k in given if k not in known]
  if unknown:
    raise ValueError(f"config.teacher: a {kind!r} teacher takes no field(s) {unknown}"
                     f"{config_lib.did_you_mean(unknown[0], known)}; "
                     f"its fields: {sorted(known)}.")


def uses_teacher(config) -> bool:
  return config.get("teacher") is not None and bool(config.teacher.get("kind"))


def validate(settings, config) -> None:
  """Config validation: the kind exists, takes every field given, can run
  with the rest of `config`."""
  if settings is None or not settings.get("kind"):
    return
  kind = settings.kind
  _check_fields(kind, list(settings.keys()))
  if settings.get("images", "same") not in IMAGES:
    raise ValueError(f"config.teacher.images={settings.images!r}: expected one of {IMAGES}.")
  check = _kind(kind)[2]
  if check is not None:
    check(settings, config)


def build(settings, student_model, *, image_size: int, epoch_steps: int):
  """The teacher of a resolved `config.teacher` (None when it has no kind).

  `image_size` is the resolution it sees (the student's, or RAML's high
  resolution views) and `epoch_steps` the steps in an epoch: all it needs
  beside its own settings.
  """
  if settings is None or not settings.get("kind"):
    return None
  cls = _kind(settings.kind)[0]
  if isinstance(cls, str):
    module, _, attr = cls.partition(":")
    cls = getattr(importlib.import_module(f"jaxdml.teacher.{module}"), attr)
  return cls(settings, student_model, image_size=int(image_size),
             epoch_steps=int(epoch_steps))


def __getattr__(name):
  if name in ("Teacher", "Frozen", "PreviousEpoch", "Momentum"):
    return getattr(importlib.import_module("jaxdml.teacher.builtin"), name)
  raise AttributeError(f"module 'jaxdml.teacher' has no attribute {name!r}")
