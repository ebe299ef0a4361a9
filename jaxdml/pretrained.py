"""`model.init_file`: start a run from torchvision/timm ImageNet weights.

A recipe (or `--config.model.init_file=resnet50.safetensors`) names a
state dict for the encoder; two-tower models take one per tower
(`model.query.init_file`, `model.gallery.init_file`). The weights are read
once, when a fresh run creates its state (a resumed run has them in its
checkpoint), with `jaxdml.models.load_torch_weights`: every backbone key must
match, the ImageNet classifier is dropped, the embedding head starts fresh.
"""

from __future__ import annotations

import jax

from jaxdml import models

INIT_FILE = "init_file"


def model_kwargs(model_config) -> dict:
  """The model config as `models.get` keywords, without the init files."""
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  kwargs.pop(INIT_FILE, None)
  for side in ("query", "gallery"):
    if isinstance(kwargs.get(side), dict):
      kwargs[side] = {k: v for k, v in kwargs[side].items() if k != INIT_FILE}
  return kwargs


def init_files(model_config) -> dict[tuple, tuple[str, dict, str]]:
  """`{subtree path: (model name, kwargs, file)}` for every encoder with a file."""
  kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  found = {}
  specs = [((), kwargs)] + [((side,), kwargs[side]) for side in ("query", "gallery")
                            if isinstance(kwargs.get(side), dict)]
  for path, spec in specs:
    if spec.get(INIT_FILE):
      rest = model_kwargs(spec)
      found[path] = (rest.pop("name"), rest, spec[INIT_FILE])
  return found


def load_into(config, state: dict, shardings: dict) -> dict:
  """`state` with the encoders' params and batch_stats from their init files."""
  for path, (name, kwargs, file) in init_files(config.model).items():
    loaded = models.load_torch_weights(name, file, seed=int(config.seed), **kwargs)
    for collection, tree in loaded.items():
      pick = (lambda t: t[path[0]]) if path else (lambda t: t)
      if jax.tree.structure(pick(state[collection])) != jax.tree.structure(tree):
        raise ValueError(f"{file}: its {collection} do not fit model {name!r} at "
                         f"{'/'.join(path) or 'the top'}; check config.model.")
      placed = jax.device_put(tree, pick(shardings[collection]))
      state[collection] = dict(state[collection], **{path[0]: placed}) if path else placed
  return state
