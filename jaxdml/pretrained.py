"""`model.init_file`: start a run from ImageNet weights or from another run.

A recipe (or `--config.model.init_file=resnet50.safetensors`) names a
torchvision/timm state dict for the encoder; two-tower models take one per
tower (`model.query.init_file`, `model.gallery.init_file`). It is read with
`jaxdml.models.load_torch_weights`: every backbone key must match, the
ImageNet classifier is dropped, the embedding head starts fresh. A jaxdml
workdir instead (fine-tuning a run of the same model) gives the encoder's
params and BatchNorm statistics of its latest checkpoint, head included.
Either is read once, when a fresh run creates its state; a resumed run has
the weights in its own checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import jax

from jaxdml import checkpoint, models, paths
from jaxdml import config as config_lib

INIT_FILE = "init_file"


def model_kwargs(model_config) -> dict:
  """The model config as `models.get` keywords, without the init files."""
  kwargs = config_lib.as_dict(model_config)
  kwargs.pop(INIT_FILE, None)
  for side in ("query", "gallery"):
    if isinstance(kwargs.get(side), dict):
      kwargs[side] = {k: v for k, v in kwargs[side].items() if k != INIT_FILE}
  return kwargs


def init_files(model_config) -> dict[tuple, tuple[str, dict, str]]:
  """`{subtree path: (model name, kwargs, file)}` for every encoder with a file."""
  kwargs = config_lib.as_dict(model_config)
  found = {}
  specs = [((), kwargs)] + [((side,), kwargs[side]) for side in ("query", "gallery")
                            if isinstance(kwargs.get(side), dict)]
  for path, spec in specs:
    if spec.get(INIT_FILE):
      rest = model_kwargs(spec)
      found[path] = (rest.pop("name"), rest, spec[INIT_FILE])
  return found


def load_into(model_config, seed: int, state: dict, shardings: dict) -> dict:
  """`state` with the encoders' params and batch_stats from their init files
  (`model_config`'s); `seed` draws the heads a weights file lacks."""
  for path, (name, kwargs, file) in init_files(model_config).items():
    pick = (lambda t, p=path: t[p[0]]) if path else (lambda t: t)
    paths.check_reachable(file, "model.init_file")
    if paths.as_path(file).is_dir():
      loaded = _from_workdir(file, path, {k: shardings[k] for k in ("params", "batch_stats")
                                          if jax.tree.leaves(state[k])})
    else:
      with _local_file(file) as local:
        loaded = models.load_torch_weights(name, local, seed=int(seed), **kwargs)
    for collection, tree in loaded.items():
      if jax.tree.structure(pick(state[collection])) != jax.tree.structure(tree):
        raise ValueError(f"{file}: its {collection} do not fit model {name!r} at "
                         f"{'/'.join(path) or 'the top'}; check config.model.")
      placed = jax.device_put(tree, pick(shardings[collection]))
      state[collection] = dict(state[collection], **{path[0]: placed}) if path else placed
  return state


@contextlib.contextmanager
def _local_file(file: str):
  """`file` itself, or a temporary local copy of a URL (the weight readers
  take local paths), removed afterwards."""
  if not paths.is_url(file):
    yield file
    return
  suffix = os.path.splitext(file)[1]
  with tempfile.NamedTemporaryFile(suffix=suffix) as f:
    f.write(paths.as_path(file).read_bytes())
    f.flush()
    yield f.name


def _from_workdir(workdir: str, path: tuple, shardings: dict) -> dict:
  """The encoder's variables at `path` of another run's latest checkpoint."""
  ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"model.init_file={workdir!r} is a directory without "
                              "checkpoints; give a trained run's workdir or a weights file.")
    if path:  # one tower of a two-tower run: restore the whole model, keep the tower
      return {k: v[path[0]] for k, v in ckpt.restore_subset(shardings).items()}
    return ckpt.restore_subset(shardings)
  finally:
    ckpt.close()
