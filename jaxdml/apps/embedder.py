"""A trained model as `(tower, uint8 images) -> float32 embeddings`.

    model = embedder.from_workdir("workdirs/demo")     # its latest checkpoint
    model = embedder.from_export("workdirs/demo/export")
    model.embed("gallery", images)                     # uint8 [N, S, S, 3]

Two routes to the same encoder: a run's workdir (its checkpoint, restored
by `jaxdml.inference.restore` and embedded batched and sharded over the
run's mesh) or its `--mode=export` SavedModel (TensorFlow, float32 on CPU
like JAX there). The image index and search commands
(`jaxdml.apps.index_images`, `jaxdml.apps.search_images`) take either. Images are made the size
the model expects by `load_images` (evaluation's transform), so both
routes see the same pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxdml import extras
from jaxdml import paths

TOWERS = ("query", "gallery")


@dataclasses.dataclass
class Embedder:
  """`source` says which model this is (`{"workdir": W, "step": S}` or
  `{"export": E, "step": S}`); `config` is the run's config."""
  source: dict
  config: object
  image_size: int
  embed_fn: Callable[[str, np.ndarray], np.ndarray]  # (tower, images) -> embeddings

  def embed(self, tower: str, images: np.ndarray) -> np.ndarray:
    """float32 [N, D] embeddings of uint8 [N, image_size, image_size, 3]."""
    if tower not in TOWERS:
      raise ValueError(f"tower={tower!r}: expected one of {TOWERS}.")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (self.image_size,) * 2 + (3,):
      raise ValueError(f"expected uint8 images [N, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.dtype} {images.shape}; load them with load_images.")
    return np.asarray(self.embed_fn(tower, images), np.float32)

  def describe(self) -> str:
    return describe(self.source)


def describe(source: dict) -> str:
  """A model source in words, for messages."""
  kind = "workdir" if "workdir" in source else "export"
  return f"{kind} {source[kind]} (step {source['step']})"


def from_workdir(workdir: str, config=None, *, batch_size: int = 256) -> Embedder:
  """The latest checkpoint of `workdir`, on the run's mesh (all devices),
  restored by `jaxdml.inference.restore` (no optimizer, no teacher).

  `config`: the run's config; default the `config.json` training wrote.
  """
  # Imported here: `--help` of the command-line tools answers without JAX.
  from jaxdml import inference  # pylint: disable=g-import-not-at-top
  model = inference.restore(workdir, config)
  fns = model.embed_fns()
  embed = lambda tower, images: inference.embed_all(fns[tower], images, batch_size, model.mesh)
  return Embedder(source={"workdir": model.workdir, "step": model.step}, config=model.config,
                  image_size=model.image_size, embed_fn=embed)


def from_export(export_dir: str, *, batch_size: int = 256) -> Embedder:
  """A `--mode=export` SavedModel (`serving_default` the gallery tower,
  `query` the query tower of two-tower models)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  tf = extras.require("tensorflow", "reading images and SavedModels")
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import export  # pylint: disable=g-import-not-at-top
  manifest = export.read_manifest(export_dir)
  saved = export.load_saved_model(export_dir)
  # Single-encoder exports have one signature: both towers are that encoder.
  signatures = {"gallery": "serving_default",
                "query": "query" if "query" in saved.signatures else "serving_default"}

  def embed(tower, images):
    serve = saved.signatures[signatures[tower]]
    return np.concatenate([serve(images=tf.constant(images[i:i + batch_size]))["embeddings"]
                           .numpy() for i in range(0, len(images), batch_size)])
  return Embedder(source={"export": paths.join(export_dir), "step": int(manifest["step"])},
                  config=config_lib.upgrade_saved(ml_collections.ConfigDict(manifest["config"])),
                  image_size=int(manifest["image_size"]), embed_fn=embed)


def from_source(source: dict, config=None, *, batch_size: int = 256) -> Embedder:
  """The model a `source` dict (`Embedder.source`) names."""
  if "export" in source:
    return from_export(source["export"], batch_size=batch_size)
  return from_workdir(source["workdir"], config, batch_size=batch_size)


# PIL refuses an image over twice its MAX_IMAGE_PIXELS (a decompression
# bomb guard, 179 megapixels); `set_pixel_limit` moves the limit.
_PIXEL_LIMIT_FIX = "resize it, or raise the limit with --max_megapixels"


def set_pixel_limit(megapixels: float) -> None:
  """Images over `megapixels` are refused by `load_image`, naming the file."""
  Image = extras.require("PIL.Image", "reading images and SavedModels")
  Image.MAX_IMAGE_PIXELS = int(megapixels * 1e6 / 2)


def load_image(path, size: int) -> np.ndarray:
  """One image file (JPEG, PNG, ...; local or a URL) as uint8 [size, size, 3]:
  evaluation's transform (shorter side to size * 8/7, centre crop). A file
  that is no image, or one over the pixel limit, is a ValueError naming it."""
  import io  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  Image = extras.require("PIL.Image", "reading images and SavedModels")
  from jaxdml.data import augment  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():  # between the limit and half of it: decoded, quietly
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(paths.as_path(path).read_bytes())) as image:
        return augment.eval_transform(image, size=size)
  except Image.DecompressionBombError as error:
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    megapixels = f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else "too many pixels"
    raise ValueError(f"image {path} has {megapixels}, over the limit of "
                     f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f}: {_PIXEL_LIMIT_FIX}.") from None
  except OSError as error:  # PIL's UnidentifiedImageError is one
    reason = ("not an image file PIL can read" if isinstance(error, Image.UnidentifiedImageError)
              else str(error))
    raise ValueError(f"cannot read image {path}: {reason}.") from None


def load_images(files, size: int, *, threads: int | None = None) -> np.ndarray:
  """`load_image` of each file, decoded in a thread pool (PIL releases the GIL)."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  from jaxdml.data import pipeline  # pylint: disable=g-import-not-at-top
  files = list(files)
  if not files:
    return np.zeros((0, size, size, 3), np.uint8)
  with futures.ThreadPoolExecutor(threads or pipeline.num_threads({})) as pool:
    return np.stack(list(pool.map(lambda f: load_image(f, size), files)))
