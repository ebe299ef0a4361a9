"""Optional dependencies: which extra brings each, and one clear error without it.

`pip install jaxdml` is the core (JAX, Flax, optax, orbax, ml_collections,
NumPy): losses, miners, memory, metrics, exact search, the `Index`, models
and the train step. The rest comes with extras named for what they bring
(pyproject.toml): `data` (the input pipeline, image decoding, TFDS sets),
`scann`, `export` (TF SavedModel), `tensorboard`, `cloud` (gs:// paths),
`weights` (.safetensors), `clustering` (NMI/AMI), or `all`. A part whose
extra is missing raises `MissingExtraError` saying which one to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level module -> (its pip package, the jaxdml extra that installs it).
OPTIONAL = {
    "PIL": ("pillow", "data"),
    "cv2": ("opencv-python-headless", "data"),
    "simplejpeg": ("simplejpeg", "data"),
    "grain": ("grain", "data"),
    "cloudpickle": ("cloudpickle", "data"),
    "tensorflow_datasets": ("tensorflow-datasets", "data"),
    "scann": ("scann", "scann"),
    "tensorflow": ("tensorflow-cpu", "export"),
    "clu": ("clu", "tensorboard"),
    "gcsfs": ("gcsfs", "cloud"),
    "safetensors": ("safetensors", "weights"),
    "sklearn": ("scikit-learn", "clustering"),
}


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message names the extra."""


def require(module: str, what: str) -> ModuleType:
  """`module` imported, or MissingExtraError: `what` needs it and
  `pip install 'jaxdml[EXTRA]'` installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    top = module.partition(".")[0]
    if top not in OPTIONAL:
      raise
    package, extra = OPTIONAL[top]
    raise MissingExtraError(
        f"{what} needs {package}, which is not installed here: pip install "
        f"'jaxdml[{extra}]' (or 'jaxdml[all]') ({type(error).__name__}: {error}).") from None


def message(module: str) -> str:
  """How to install `module`'s extra, for warnings that let a run go on."""
  package, extra = OPTIONAL[module.partition(".")[0]]
  return f"{package} is not installed (pip install 'jaxdml[{extra}]')"
