"""jaxdml: deep metric learning and image retrieval in JAX/Flax.

Its parts work in your own Flax/optax loop, without the trainer, a config
or a workdir:

    from jaxdml import losses, memory, models, retrieval
    loss, aux = losses.get("triplet")(embeddings=E, labels=y)       # PML's TripletMarginLoss()
    index = retrieval.Index.build(gallery)                          # exact or ScaNN
    scores, ids = index.search(queries, k=10)

Subpackages load when first used, so `import jaxdml` is cheap:
`losses` (losses, miners, distances), `memory` (the cross-batch memory),
`models` (encoders and weight import), `retrieval` (search, metrics,
`Index`, re-ranking), `data` (input pipelines; the `data` extra),
`config` (recipes and their checks), `build`, `objective`, `train` and
`inference` (the trainer's parts), `sharding` (meshes, and
`on_any_mesh` for your own functions of arrays), `evaluators`, `teacher`,
`apps` (export, the image index) and `tools` (benchmarks). `extras` says
which optional dependencies each extra brings.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["apps", "build", "config", "data", "evaluators", "extras", "inference", "losses",
           "memory", "models", "objective", "recipes", "retrieval", "sharding", "teacher", "tools",
           "train", "__version__"]

# Before any storage client starts: STORAGE_EMULATOR_HOST sends every gs://
# access to a local server (jaxdml.paths).
from jaxdml import paths as _paths  # pylint: disable=g-import-not-at-top,wrong-import-position
_paths.configure_emulator()


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"jaxdml.{name}")
  raise AttributeError(f"module 'jaxdml' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
