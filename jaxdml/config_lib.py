"""Config helpers: big_vision-style `file.py:ARG` parsing and validation.

A recipe is `configs/NAME.py` with `get_config(arg=None) -> ConfigDict`.
`arg` is a comma-separated list of flags and `key=value` pairs
(`smoke`, `demo,seed=3`), parsed by `parse_arg` against declared defaults so
a typo in the argument is an error, not a silently ignored word.
"""

from __future__ import annotations

import ast
import difflib

import ml_collections

# Every field the trainer reads at the top level of a config. A field outside
# this set is almost always a typo (`optimzer`), so `validate` rejects it.
TOP_LEVEL_FIELDS = {
    "seed": "int: seeds parameters, data order and per-step RNG",
    "task": "'sbir' (two towers, sketch -> photo) or 'single' (one encoder)",
    "batch_size": "int: global batch size, split over all devices",
    "total_steps": "int: number of train steps",
    "log_every": "int: steps between metrics.jsonl lines",
    "eval_every": "int: steps between evaluations (0: only at the end)",
    "checkpoint_every": "int: steps between checkpoints",
    "keep_checkpoints": "int: how many checkpoints to keep",
    "mesh": "dict axis -> size (-1: all remaining devices), e.g. {'data': -1}",
    "sharding": "'replicated' or 'fsdp': how parameters are laid out",
    "sharding_rules": "dict regex -> PartitionSpec tuple, first match wins over `sharding`, "
                      "e.g. {'proxies$': ('data', None)} splits a proxy table by class",
    "model": "encoder config, see jaxdml.models",
    "loss": "the ranking loss, name and hyperparameters (None: terms only), see jaxdml.losses",
    "terms": "weighted terms added to the loss, name -> {weight, loss (default: the name), "
             "**hparams}: distillation and regularisers",
    "epoch_steps": "int: steps per epoch (0: none); previous_epoch teachers and losses that "
                   "consume training progress use it",
    "optimizer": "optimizer, schedule, clipping, weight decay",
    "data": "data set and pipeline, see jaxdml.data.default_data_config",
    "eval": "retrieval evaluation settings",
    "memory": "cross-batch memory: size, start_step, adapt",
    "teacher": "distillation teacher: kind and that kind's fields, see jaxdml.teacher",
}

# Fields a config may still carry from before a rename: the error says where
# they went.
RENAMED = {
    "regularizers": "config.terms (name -> dict(weight=..., **hparams))",
    "teacher.loss": "config.terms.NAME (e.g. config.terms.obd_sd = dict(weight=1.0, ...))",
    "teacher.epoch_steps": "config.epoch_steps",
}

# Top-level defaults: `resolve` fills them in, so the resolved config (what
# --mode=print_config shows) holds every value a run uses.
DEFAULTS = {
    "log_every": 50, "eval_every": 0, "checkpoint_every": 1000, "keep_checkpoints": 3,
    "mesh": {"data": -1}, "sharding": "replicated", "sharding_rules": {}, "epoch_steps": 0,
    "terms": {},
    "teacher": None, "eval": None,
}


def _section_defaults() -> dict:
  """Defaults of the sub-configs, kept by the modules that read them."""
  # Imported here: recipe files import this module before JAX is needed.
  from jaxdml import optim, tasks  # pylint: disable=g-import-not-at-top
  from jaxdml.retrieval import evaluator  # pylint: disable=g-import-not-at-top
  return {"optimizer": optim.DEFAULTS, "memory": tasks.MEMORY_DEFAULTS,
          "eval": evaluator.DEFAULTS}


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses `"smoke,seed=3"` into a ConfigDict with the declared defaults.

  Each keyword of `spec` declares a key and its default; values in `arg` are
  converted to the default's type. A bare word sets a bool to True.
  `lazy=True` accepts undeclared keys (strings, or Python literals).
  """
  result = ml_collections.ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in spec and not lazy:
      raise ValueError(
          f"Unknown config argument {key!r}; this config accepts "
          f"{sorted(spec)}{_did_you_mean(key, spec)}.")
    if not has_value:
      result[key] = True
      continue
    default = spec.get(key)
    result[key] = _convert(value, default, key)
  return result


def _convert(value: str, default, key: str):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"Config argument {key}={value!r}: expected a bool.")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(
          f"Config argument {key}={value!r}: expected {type(default).__name__}."
      ) from None
  if default is None:
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def _did_you_mean(word: str, candidates) -> str:
  close = difflib.get_close_matches(word, list(candidates), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming any unknown, renamed or missing field, an
  unknown loss, or a teacher kind or field that does not exist."""
  for old, new in RENAMED.items():
    parent, _, leaf = old.rpartition(".")
    holder = config.get(parent) if parent else config
    if holder is not None and leaf in holder:
      raise ValueError(f"config.{old} was renamed: use {new}.")
  for key in config.keys():
    if key not in TOP_LEVEL_FIELDS:
      raise ValueError(
          f"Unknown config field {key!r}{_did_you_mean(key, TOP_LEVEL_FIELDS)}. "
          f"Known fields: {sorted(TOP_LEVEL_FIELDS)}.")
  required = ("seed", "task", "batch_size", "total_steps", "model", "loss",
              "optimizer", "data")
  missing = [k for k in required if k not in config]
  if missing:
    raise ValueError(f"Config is missing required fields {missing}.")
  if config.task not in ("sbir", "single"):
    raise ValueError(
        f"config.task={config.task!r}: expected 'sbir' or 'single'.")
  for key in ("batch_size", "total_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  # Imported here: recipe files import this module before JAX is needed.
  from jaxdml import losses, tasks, teacher  # pylint: disable=g-import-not-at-top
  if config.loss is None and not tasks.terms(config):
    raise ValueError("config.loss is None and config.terms is empty: nothing to train.")
  if config.loss is not None:
    losses.get(config.loss.name)
  for term, name, _, _ in tasks.terms(config):
    try:
      losses.get(name)
    except ValueError as e:
      raise ValueError(f"config.terms.{term}: {e}") from None
  teacher.validate(config)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A validated copy of `config` with every default filled in."""
  resolved = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  with resolved.unlocked():
    for key, default in DEFAULTS.items():
      if key not in resolved:
        resolved[key] = default
    for key, defaults in _section_defaults().items():
      if key not in resolved:
        resolved[key] = defaults
      elif resolved[key] is not None:
        for sub, value in defaults.items():
          if sub not in resolved[key]:
            resolved[key][sub] = value
  validate(resolved)
  return resolved


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Calls `get_config(arg)` of the recipe file at `path` (as `--config` does)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"No recipe file {path!r}.")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jaxdml_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
