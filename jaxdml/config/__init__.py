"""The config layer: recipes loaded, checked and completed, without JAX.

A recipe is `configs/NAME.py` with `get_config(arg=None) -> ConfigDict`.
`arg` is a comma-separated list of flags and `key=value` pairs
(`smoke`, `demo,seed=3`), parsed by `parse_arg` against declared defaults so
a typo in the argument is an error, not a silently ignored word.

`resolve(config)` is the one place defaults are filled in (`defaults.py`)
and the config is checked: unknown, renamed or missing fields, unknown
losses, teacher kinds and evaluator types, and settings a part does not
take fail here, before anything compiles. The build layer (`jaxdml.build`)
then turns the resolved config into the run's parts once; nothing after it
reads the config. Loading, checking and printing a recipe import neither
JAX nor TensorFlow (`python -m jaxdml.main --mode=print_config`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from jaxdml.config import datasets, defaults

__all__ = ["parse_arg", "load_config", "recipe_path", "recipes", "expand_recipe_flags",
           "default_data_config", "resolve", "validate", "upgrade_saved", "as_dict",
           "config_dict", "datasets", "defaults", "TOP_LEVEL_FIELDS", "RENAMED", "LOSS_WRAPPERS",
           "loss_names"]

# Every field the trainer reads at the top level of a config. A field outside
# this set is almost always a typo (`optimzer`), so `validate` rejects it.
TOP_LEVEL_FIELDS = {
    "seed": "int: seeds parameters, data order and per-step RNG",
    "task": "'sbir' (two towers, sketch -> photo) or 'single' (one encoder)",
    "batch_size": "int: global batch size, split over all devices",
    "total_steps": "int: number of train steps",
    "log_every": "int: steps between metrics.jsonl lines",
    "eval_every": "int: steps between evaluations (0: only at the end); an evaluator's "
                  "`every` overrides it",
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
    "data": "data set and pipeline, see jaxdml.data",
    "evals": "evaluators, name -> {type, **settings}, see jaxdml.evaluators",
    "memory": "cross-batch memory: size, start_step, adapt, loss_form",
    "teacher": "distillation teacher: kind and that kind's fields, see jaxdml.teacher",
}

# Fields a config may still carry from before a rename: the error says where
# they went.
RENAMED = {
    "regularizers": "config.terms (name -> dict(weight=..., **hparams))",
    "teacher.loss": "config.terms.NAME (e.g. config.terms.obd_sd = dict(weight=1.0, ...))",
    "teacher.epoch_steps": "config.epoch_steps",
    "memory.terms": "config.memory.loss_form (joint, xbm or pml; config.terms are the "
                    "weighted loss terms)",
    "eval": "config.evals (name -> dict(type='retrieval', ks=..., ...), see "
            "jaxdml.evaluators)",
}


def as_dict(value) -> dict:
  """A plain dict of a ConfigDict, a mapping or None (empty)."""
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def config_dict(spec: dict) -> ml_collections.ConfigDict:
  """A ConfigDict of plain defaults; a type as a value is a field of that
  type, unset (None until given), so `--config.X=` can still set it."""
  placeholder = ml_collections.config_dict.placeholder
  convert = lambda v: (placeholder(v) if isinstance(v, type)
                       else config_dict(v) if isinstance(v, dict) else v)
  return ml_collections.ConfigDict({k: convert(v) for k, v in spec.items()})


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` with every default (`defaults.DATA`); recipes start here."""
  return config_dict(defaults.DATA)


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
          f"{sorted(spec)}{did_you_mean(key, spec)}.")
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


def did_you_mean(word: str, candidates) -> str:
  close = difflib.get_close_matches(word, list(candidates), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_fields(section: str, given, known) -> None:
  """ValueError naming the fields of `given` that `known` lacks (where one
  was renamed, where it went)."""
  unknown = sorted(k for k in given if k not in known)
  for field in unknown:
    old = f"{section.removeprefix('config.')}.{field}"
    if old in RENAMED:
      raise ValueError(f"config.{old} was renamed: use {RENAMED[old]}.")
  if unknown:
    raise ValueError(f"{section}: unknown field(s) {unknown}{did_you_mean(unknown[0], known)}; "
                     f"known: {sorted(known)}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming any unknown, renamed or missing field, an
  unknown loss, a teacher kind or field that does not exist, or an
  evaluator type or setting that does not."""
  for old, new in RENAMED.items():
    parent, _, leaf = old.rpartition(".")
    holder = config.get(parent) if parent else config
    if holder is not None and leaf in holder:
      raise ValueError(f"config.{old} was renamed: use {new}.")
  for key in config.keys():
    if key not in TOP_LEVEL_FIELDS:
      raise ValueError(
          f"Unknown config field {key!r}{did_you_mean(key, TOP_LEVEL_FIELDS)}. "
          f"Known fields: {sorted(TOP_LEVEL_FIELDS)}.")
  missing = [k for k in defaults.REQUIRED if k not in config]
  if missing:
    raise ValueError(f"Config is missing required fields {missing}.")
  if config.task not in defaults.TASKS:
    raise ValueError(f"config.task={config.task!r}: expected 'sbir' or 'single'.")
  for key in ("batch_size", "total_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key} must be positive, got {config[key]}.")
  check_fields("config.optimizer", as_dict(config.optimizer), defaults.OPTIMIZER)
  memory = as_dict(config.get("memory"))
  check_fields("config.memory", memory, defaults.MEMORY)
  if memory.get("loss_form", "joint") not in defaults.MEMORY_LOSS_FORMS:
    raise ValueError(f"config.memory.loss_form={memory['loss_form']!r}: expected one of "
                     f"{defaults.MEMORY_LOSS_FORMS} (see jaxdml.memory.loss_with_memory).")
  # Registries: light modules, their implementations are imported when used.
  from jaxdml import evaluators, losses, teacher  # pylint: disable=g-import-not-at-top
  terms = as_dict(config.get("terms"))
  if config.loss is None and not terms:
    raise ValueError("config.loss is None and config.terms is empty: nothing to train.")
  if config.loss is not None:
    for name in loss_names(config.loss):
      try:
        losses.check_name(name)
      except ValueError as e:
        raise ValueError(f"config.loss: {e}") from None
    if as_dict(config.loss).get("reduction") is not None:
      from jaxdml.losses import reducer_spec  # pylint: disable=g-import-not-at-top
      try:
        reducer_spec.parse(as_dict(config.loss)["reduction"])
      except ValueError as e:
        raise ValueError(f"config.loss: {e}") from None
  for term, settings in terms.items():
    try:
      losses.check_name(as_dict(settings).get("loss", term))
    except ValueError as e:
      raise ValueError(f"config.terms.{term}: {e}") from None
  teacher.validate(config.get("teacher"), config)
  evaluators.validate(config.get("evals"))


# PML's loss wrappers (jaxdml.losses.wrappers): config.loss names one with
# its arguments, e.g. dict(name="self_supervised", loss=dict(name="ntxent")).
LOSS_WRAPPERS = ("self_supervised", "multiple")


def loss_names(spec) -> list:
  """The registered losses a `{name, **hparams}` loss config uses: its name,
  or for a wrapper the losses it wraps (`loss`, or each of `losses`)."""
  spec = as_dict(spec)
  name = spec.get("name")
  if name not in LOSS_WRAPPERS:
    return [name]
  inner = [spec.get("loss")] if name == "self_supervised" else spec.get("losses") or []
  inner = [x for x in (inner.values() if isinstance(inner, dict) else inner) if x is not None]
  names = [x if isinstance(x, str) else as_dict(x).get("name") for x in inner]
  if not names:
    raise ValueError(f"config.loss: {name} wraps no loss; give "
                     + ("loss=dict(name=...)." if name == "self_supervised"
                        else "losses={key: dict(name=...), ...}."))
  return names


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A validated copy of `config` with every default filled in."""
  resolved = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  with resolved.unlocked():
    for key, default in defaults.TOP.items():
      if key not in resolved:
        resolved[key] = config_dict({"x": default})["x"] if isinstance(default, dict) else default
    for key, section in (("optimizer", defaults.OPTIMIZER), ("memory", defaults.MEMORY),
                         ("data", defaults.DATA)):
      if resolved.get(key) is None:
        resolved[key] = config_dict(section)
      else:
        _fill(resolved[key], section)
  validate(resolved)
  from jaxdml import evaluators, teacher  # pylint: disable=g-import-not-at-top
  with resolved.unlocked():
    if teacher.uses_teacher(resolved):
      _fill(resolved.teacher, teacher.fields(resolved.teacher.kind))
    for name in resolved.evals:
      _fill(resolved.evals[name], evaluators.settings_of(resolved.evals[name].type))
  return resolved


def _fill(section: ml_collections.ConfigDict, spec: dict) -> None:
  """Adds the fields of `spec` that `section` lacks (nested dicts too)."""
  for key, value in spec.items():
    if key not in section:
      section[key] = config_dict({"x": value})["x"]
    elif isinstance(value, dict) and isinstance(section[key], ml_collections.ConfigDict):
      _fill(section[key], value)


def upgrade_saved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config a run saved before a rename (its `config.json`, an export's or
  an index's manifest), with the renamed fields moved where they went, so
  an old run still evaluates, exports and indexes. Recipes and command-line
  overrides get `validate`'s error instead."""
  c = ml_collections.ConfigDict(as_dict(config))
  with c.unlocked():
    memory = c.get("memory")
    if memory is not None and "terms" in memory:
      memory.loss_form = memory.terms
      del memory["terms"]
    if "eval" in c:
      old = as_dict(c.eval)
      del c["eval"]
      c.evals = ml_collections.ConfigDict()
      if old and old.pop("enabled", True):
        protocols = old.pop("protocols", None)
        asymmetric = old.pop("asymmetric", False) or "asymmetric" in (protocols or ())
        every = old.pop("every", {}) or {}
        settings = {k: v for k, v in old.items() if k in defaults.RETRIEVAL}
        c.evals.retrieval = dict(type="retrieval", **settings)
        if asymmetric:
          c.evals.asym = dict(type="asymmetric", **settings, picture=False,
                              every=every.get("asymmetric"))
  return c


def recipe_dirs() -> list[str]:
  """Where recipes are found by name: the `configs/` of the source checkout
  this `jaxdml` is imported from, when it is one, then the installed
  `jaxdml.configs` (an editable install elsewhere maps that to its own
  checkout, whose recipes may not match this code)."""
  found = []
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
  checkout = os.path.join(root, "configs")
  # A source checkout has its pyproject.toml beside; site-packages/configs is someone else's.
  if os.path.isdir(checkout) and os.path.isfile(os.path.join(root, "pyproject.toml")):
    found.append(checkout)
  spec = importlib.util.find_spec("jaxdml.configs")
  if spec is not None and spec.submodule_search_locations:
    found += [d for d in map(os.path.abspath, spec.submodule_search_locations)
              if d not in found]
  return found


def recipes() -> list[str]:
  """The names of the recipes jaxdml ships (`sketchy_rtl`, `sop_xbn`, ...)."""
  return sorted({f[:-3] for d in recipe_dirs() for f in os.listdir(d)
                 if f.endswith(".py") and not f.startswith("_")})


def recipe_path(spec: str) -> str:
  """The file a recipe spec names: a path (`configs/sketchy_rtl.py`), or a
  shipped recipe's name (`sketchy_rtl`)."""
  if spec.endswith(".py") or os.sep in spec or os.path.exists(spec):
    return spec
  for directory in recipe_dirs():
    path = os.path.join(directory, f"{spec}.py")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"No recipe {spec!r}{did_you_mean(spec, recipes())}: give a path "
                          f"to a recipe file, or one of {recipes()}.")


def expand_recipe_flags(argv: list[str], flag: str = "config") -> list[str]:
  """`argv` with `--config=NAME[:ARG]` naming a shipped recipe rewritten to
  its file, so ml_collections' config flag (which takes a path) finds it."""
  out, i = [], 0
  while i < len(argv):
    item = argv[i]
    if item in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
      item, i = f"--{flag}={argv[i + 1]}", i + 1
    if item.startswith((f"--{flag}=", f"-{flag}=")):
      prefix, _, value = item.partition("=")
      spec, sep, arg = value.partition(":")
      try:
        path = recipe_path(spec)
        if not os.path.exists(path):
          raise FileNotFoundError(f"No recipe file {path!r}: give a path to a recipe file, or "
                                  f"a recipe's name, one of {recipes()}.")
        item = f"{prefix}={path}{sep}{arg}"
      except FileNotFoundError as error:
        raise SystemExit(f"FATAL Flags parsing error: {error}") from None
    out.append(item)
    i += 1
  return out


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Calls `get_config(arg)` of a recipe (a file's path, or a shipped
  recipe's name: `recipe_path`), as `--config` does."""
  path = recipe_path(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No recipe file {path!r}.")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"jaxdml_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get(config: Any, key: str, default=None):
  """`config.key`, `default` where the config (or the field) is missing."""
  value = config.get(key, default) if config is not None else default
  return default if value is None and default is not None else value
