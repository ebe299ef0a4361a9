"""jaxdml: deep metric learning and image retrieval in JAX/Flax."""

__version__ = "0.1.0"

# Before any storage client starts: STORAGE_EMULATOR_HOST sends every gs://
# access to a local server (jaxdml.paths).
from jaxdml import paths as _paths  # pylint: disable=g-import-not-at-top,wrong-import-position
_paths.configure_emulator()
