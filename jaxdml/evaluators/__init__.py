"""Evaluators: `config.evals` maps a name to a type and its settings.

    c.evals.retrieval = dict(type="retrieval", ks=(1, 2, 4, 8), metrics=("recall", "mrr"))
    c.evals.asym = dict(type="asymmetric", every=1000)       # RAML's protocol

In big_vision's manner, each type is one module with one class: it loads
its own data, sees only embed functions (tower -> `uint8 images ->
embeddings`, from the run's parts or a restored model) and returns
metrics. Every type takes `enabled` and `every` (steps between runs; None:
`config.eval_every`, 0: only at the end; all run at the last step).

Types (defaults in `jaxdml.config.defaults.EVALUATOR_TYPES`):
- `retrieval` (`retrieval.py`): the data set's own protocol (`protocol`
  "auto"): Sketchy's sketches -> test photos (instance hits, and category
  hits under `category/`), leave-one-out over the test set (CUB, Cars,
  SOP), query -> gallery (In-Shop, DeepFashion2); scored by
  `jaxdml.retrieval.evaluate` (any metric it knows: recall, r_precision,
  map@r, map, mrr, nmi, ami), plus `nn_distance`; draws
  `workdir/NAME_STEP.png`.
- `asymmetric` (`asymmetric.py`): RAML's: the student's queries against a
  database the teacher tower embeds at its own image size, under `asym/`.

A new type is one module with a `jaxdml.evaluators.base.Evaluator`
subclass and one `register(type, cls, settings)` call, from inside the
package or from a user's code. This module is the registry and the config
checks and imports no JAX; the classes load when a run builds them.
"""

from __future__ import annotations

import importlib

from jaxdml.config import defaults

COMMON = defaults.EVALUATOR


class EvaluationAbandoned(Exception):
  """The run was asked to stop (SIGTERM, Ctrl-C) during an evaluation."""

# type -> (the class, or "module:attr" of jaxdml.evaluators, loaded when
# built; its own settings with their defaults).
_TYPES: dict[str, tuple] = {
    "retrieval": ("retrieval:Retrieval", defaults.EVALUATOR_TYPES["retrieval"]),
    "asymmetric": ("asymmetric:Asymmetric", defaults.EVALUATOR_TYPES["asymmetric"]),
}


def register(type_name: str, cls, settings: dict) -> None:
  """Adds evaluator type `type_name`: `cls` a `base.Evaluator` subclass,
  `settings` its own settings and their defaults (beside `COMMON`)."""
  if type_name in _TYPES:
    raise ValueError(f"evaluator type {type_name!r} is already registered; pick another name.")
  _TYPES[type_name] = (cls, dict(settings))


def types() -> tuple:
  return tuple(sorted(_TYPES))


def _entry(type_name) -> tuple:
  if type_name not in _TYPES:
    raise ValueError(f"evaluator type {type_name!r}: expected one of {types()} "
                     "(jaxdml.evaluators.register adds one).")
  return _TYPES[type_name]


def settings_of(type_name: str) -> dict:
  """Every setting of an evaluator of this type, with its default."""
  return {**COMMON, **_entry(type_name)[1], "type": type_name}


def validate(evals) -> None:
  """Each entry of `config.evals` names a known type and only its settings."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  prefixes = {}
  for name, settings in config_lib.as_dict(evals).items():
    if not isinstance(settings, dict) or not settings.get("type"):
      raise ValueError(f"config.evals.{name}: expected dict(type=..., **settings) with type "
                       f"one of {types()}, got {settings!r}.")
    try:
      known = settings_of(settings["type"])
    except ValueError as e:
      raise ValueError(f"config.evals.{name}: {e}") from None
    unknown = sorted(k for k in settings if k not in known)
    if unknown:
      raise ValueError(f"config.evals.{name}: a {settings['type']!r} evaluator takes no "
                       f"setting(s) {unknown}{config_lib.did_you_mean(unknown[0], known)}; "
                       f"its settings: {sorted(known)}.")
    if "prefix" not in known or not settings.get("enabled", True):
      continue
    prefix = settings.get("prefix", known["prefix"])
    if prefix in prefixes:
      raise ValueError(f"config.evals.{name} and config.evals.{prefixes[prefix]} both report "
                       f"under prefix {prefix!r}: give one another `prefix`.")
    prefixes[prefix] = name


def evaluator_class(type_name: str):
  cls = _entry(type_name)[0]
  if isinstance(cls, str):
    module, _, attr = cls.partition(":")
    cls = getattr(importlib.import_module(f"jaxdml.evaluators.{module}"), attr)
  return cls


def build(evals, *, data, task: str, towers: dict, mesh, workdir=None,
          default_every: int = 0) -> list:
  """The enabled evaluators of a resolved `config.evals`, their data loaded.

  `data`: the run's `config.data`; `towers`: tower -> the image size it
  embeds at (the teacher's own for a teacher tower); `default_every`:
  `config.eval_every`.
  """
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  built = []
  for name, settings in config_lib.as_dict(evals).items():
    settings = {**settings_of(settings["type"]), **settings}
    if not settings.pop("enabled"):
      continue
    every = settings.pop("every")
    cls = evaluator_class(settings.pop("type"))
    built.append(cls(name, data=data, task=task, towers=towers, mesh=mesh, workdir=workdir,
                     every=default_every if every is None else int(every), **settings))
  return built


def uses_teacher(evals) -> bool:
  """Whether an enabled evaluator of a resolved `config.evals` embeds with
  the teacher tower (a restored model then needs the teacher's variables)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  return any(evaluator_class(s["type"]).needs_teacher
             for s in config_lib.as_dict(evals).values() if s.get("enabled", True))
