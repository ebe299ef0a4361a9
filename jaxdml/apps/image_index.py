"""An index of a folder of images that `jaxdml.apps.search_images` searches.

    model = embedder.from_workdir("workdirs/demo")
    index = image_index.build_index(model, "photos/", "photos.index")
    index = image_index.load_index("photos.index")
    scores, rows = image_index.search_index(index, model, queries, k=10)
    index.path_of(rows[0, 0])                   # the best match of query 0

An image index is a `jaxdml.retrieval.Index` of the images' embeddings
(exact search, or ScaNN audited at build time; `retrieval/index.py`), plus
the folder's file names and the model's identity. INDEX/ (a local folder
or a URL) holds
- `embeddings.npy`: float32 [N, D], as the model outputs them;
- `files.json`: the images folder and each file's path in it, sorted;
- `scann/`: the serialized ScaNN searcher, backend "scann" only;
- `manifest.json`: the `Index`'s (format, similarity, dim, count, backend,
  ScaNN's settings and audit, each file's size and sha256), and the model
  (workdir or export, and step), its config, image size, tower, the
  model's probe embeddings (below) and the files left out because they did
  not load (`skipped`, with why).
It is written in a temporary folder and renamed into place (a URL: uploaded,
the manifest last), so an interrupted build never leaves an index that
loads; loading checks every file against the manifest, and an index of
format 1 (before the checksums) is refused with the command to rebuild it.

The model's identity: at build time the index's tower embeds `probe_images`
(fixed, seeded) and the manifest keeps those embeddings. A query model must
embed them the same way (cosine >= PROBE_MIN_COSINE per row): another
checkpoint or seed is refused, the same run through its export passes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np

from jaxdml import extras
from jaxdml import paths
from jaxdml.apps.embedder import Embedder, describe, load_image
from jaxdml.retrieval import index as index_lib
from jaxdml.retrieval.index import Index, IndexFileError

FILES = "files.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROBE_ROWS = 4
# Float rounding (another device count, TF instead of XLA) moves cosines by
# ~1e-6; another model's embeddings are far below this.
PROBE_MIN_COSINE = 0.999
# The manifest's entries an image index adds to an `Index`'s.
MODEL_KEYS = ("model", "config", "image_size", "tower", "probe")
REBUILD = ("rebuild it with python -m jaxdml.apps.index_images --workdir=... (or --export=...) "
           "--images=FOLDER --out=INDEX")


class ModelMismatchError(ValueError):
  """The query model is not the one the index was made with."""


@dataclasses.dataclass
class ImageIndex:
  """A built or loaded image index: `index` searches, `files[row]` is what
  a row shows, `manifest` is what was saved (model included)."""
  path: str
  manifest: dict
  index: Index
  folder: str
  files: list

  @property
  def embeddings(self) -> np.ndarray:
    return self.index.embeddings

  def path_of(self, row: int) -> str:
    """The full path (or URL) of the image in `row`."""
    return paths.join(self.folder, self.files[int(row)])


def probe_images(size: int) -> np.ndarray:
  """The fixed uint8 images whose embeddings identify a model."""
  return np.random.default_rng(0).integers(0, 256, (PROBE_ROWS, size, size, 3), np.uint8)


def list_images(folder) -> list:
  """Paths (relative, '/'-separated, sorted) of the .jpg, .jpeg and .png
  files (any case) in `folder` and its sub-folders."""
  root = paths.as_path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"--images={folder}: no such folder.")
  found = []

  def walk(directory, prefix):
    # Level by level: epath refuses `**` globs on buckets.
    for item in directory.iterdir():
      if item.is_dir():
        walk(item, f"{prefix}{item.name}/")
      elif item.suffix.lower() in IMAGE_SUFFIXES:
        found.append(prefix + item.name)
  walk(root, "")
  if not found:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder} "
                            "or its sub-folders.")
  return sorted(found)


def _load_or_reason(path, size):
  try:
    return load_image(path, size)
  except ValueError as error:  # not an image, cut short, over the pixel limit
    return str(error)


def embed_files(model: Embedder, folder, files, *, tower="gallery", batch_size=256,
                threads=None, progress=True) -> tuple[np.ndarray, dict]:
  """`(embeddings float32 [N', D], skipped)`: the embeddings of `folder`'s
  `files` that load, in order, and `{file: why}` of those that do not.
  Batch by batch; the next batch decodes (in a thread pool) while this one
  is embedded."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from jaxdml.data import pipeline  # pylint: disable=g-import-not-at-top
  chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
  outputs, skipped = [], {}
  with futures.ThreadPoolExecutor(threads or pipeline.num_threads(model.config.data)) as pool, \
      tqdm.tqdm(total=len(files), desc="embed", unit="image", disable=not progress,
                dynamic_ncols=True) as bar:
    submit = lambda chunk: [(f, pool.submit(_load_or_reason, paths.join(folder, f),
                                            model.image_size)) for f in chunk]
    pending = submit(chunks[0])
    for i in range(len(chunks)):
      ready, pending = pending, submit(chunks[i + 1]) if i + 1 < len(chunks) else []
      loaded = []
      for file, image in ((f, future.result()) for f, future in ready):
        if isinstance(image, str):
          skipped[file] = image
        else:
          loaded.append(image)
      if loaded:
        outputs.append(model.embed(tower, np.stack(loaded)))
      bar.update(len(ready))
  dim = outputs[0].shape[1] if outputs else 0
  return (np.concatenate(outputs) if outputs else np.zeros((0, dim), np.float32)), skipped


def build_index(model: Embedder, images, out, *, tower="gallery", batch_size=256,
                backend="auto", similarity="cosine", scann_config=None, threads=None,
                progress=True, strict=False) -> ImageIndex:
  """Embeds every image in the folder `images` with `model`'s `tower` and
  writes the index to `out` (replacing an index there). `backend` "auto" is
  exact search below `scann_backend.BRUTE_FORCE_BELOW` images, ScaNN above
  (`Index.build`). A file that does not load (not an image, cut short, over
  the pixel limit) is left out and listed in the manifest's `skipped`;
  `strict` makes it an error instead. Returns the index, as
  `load_index(out)` would."""
  index_lib.check_options(similarity, backend)  # before the long part
  index_lib.check_replaceable(out)
  files = list_images(images)
  embeddings, skipped = embed_files(model, images, files, tower=tower, batch_size=batch_size,
                                    threads=threads, progress=progress)
  if skipped and (strict or len(skipped) == len(files)):
    listed = "; ".join(skipped.values())
    raise ValueError(f"{len(skipped)} of the {len(files)} image files in {images} do not load "
                     f"({listed[:500]}{'...' if len(listed) > 500 else ''}). Nothing was "
                     "written" + ("." if len(skipped) == len(files) else
                                  "; without --strict they are left out of the index."))
  files = [f for f in files if f not in skipped]
  index = Index.build(embeddings, similarity=similarity, backend=backend,
                      scann_config=scann_config)
  folder = paths.join(images)
  metadata = {"model": model.source, "config": json.loads(model.config.to_json()),
              "image_size": model.image_size, "tower": tower,
              "probe": model.embed(tower, probe_images(model.image_size)).tolist(),
              "skipped": skipped}
  listing = json.dumps({"folder": folder, "files": files}, indent=1).encode()
  manifest = index.save(out, metadata=metadata, attachments={FILES: listing})
  return ImageIndex(path=paths.join(out), manifest=manifest, index=index, folder=folder,
                    files=files)


def load_index(path) -> ImageIndex:
  """The index `build_index` wrote at `path` (a folder or a URL), every
  file checked against its manifest (`retrieval.index.read`)."""
  saved = index_lib.read(path, rebuild=REBUILD)
  missing = [key for key in MODEL_KEYS if key not in saved.manifest]
  if missing or FILES not in saved.attachments:
    raise IndexFileError(f"{paths.join(path)} is an index of embeddings, not of images (no "
                         f"{FILES} or {MODEL_KEYS} in its manifest): {REBUILD}.")
  try:
    listing = json.loads(saved.attachments[FILES])
    folder, files = listing["folder"], listing["files"]
  except (ValueError, KeyError, TypeError):
    raise IndexFileError(f"{paths.join(path)}: {FILES} is not a files list; {REBUILD}.") from None
  if not isinstance(files, list) or len(files) != saved.index.count:
    raise IndexFileError(f"{paths.join(path)}: {FILES} lists {len(files)} files for "
                         f"{saved.index.count} embeddings; the index is damaged or mixed with "
                         f"another index's files: {REBUILD}.")
  return ImageIndex(path=paths.join(path), manifest=saved.manifest, index=saved.index,
                    folder=folder, files=files)


def check_model(index: ImageIndex, model: Embedder) -> None:
  """Raises ModelMismatchError unless `model` embeds the index's probe as
  the index's model did."""
  made_with = describe(index.manifest["model"])
  fix = ("Rebuild the index with this model (python -m jaxdml.apps.index_images), or search with the "
         "index's model (leave out --workdir/--export).")
  if model.image_size != index.manifest["image_size"]:
    raise ModelMismatchError(
        f"The query model, {model.describe()}, takes {model.image_size} px images; index "
        f"{index.path} was made with {made_with} at {index.manifest['image_size']} px. {fix}")
  stored = np.asarray(index.manifest["probe"], np.float32)
  got = model.embed(index.manifest["tower"], probe_images(model.image_size))
  if got.shape != stored.shape:
    raise ModelMismatchError(
        f"The query model, {model.describe()}, makes {got.shape[1]}-d embeddings; index "
        f"{index.path} holds {stored.shape[1]}-d ones made with {made_with}. {fix}")
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  cosine = float(np.min(np.sum(unit(got) * unit(stored), axis=1)))
  if cosine < PROBE_MIN_COSINE:
    raise ModelMismatchError(
        f"The query model, {model.describe()}, is not the model index {index.path} was "
        f"made with, {made_with}: their {index.manifest['tower']} embeddings of the probe "
        f"images differ (cosine {cosine:.4f} < {PROBE_MIN_COSINE}). {fix}")


def search_embeddings(index: ImageIndex, queries: np.ndarray, k: int = 10):
  """`(scores float32 [Q, k'], rows int64 [Q, k'])` of the index's nearest
  items to `queries` (embeddings), best first; k' = min(k, count)."""
  return index.index.search(queries, min(int(k), index.index.count))


def search_index(index: ImageIndex, model: Embedder, images: np.ndarray, *, k: int = 10,
                 tower: str = "query"):
  """Embeds uint8 `images` (`embedder.load_images`) with `model`'s `tower`
  (for SBIR "query" is the sketch encoder) and searches the index; the
  model is checked first (`check_model`). Returns `search_embeddings`'s."""
  check_model(index, model)
  return search_embeddings(index, model.embed(tower, images), k)


def write_eval_images(config, folder) -> list:
  """Writes the evaluation images of `config`'s data (the embedded set's
  test photos and sketches, for the demo) as PNG files to `folder`, named
  after what they show; returns their paths. Something to index and search."""
  Image = extras.require("PIL.Image", "writing images")
  from jaxdml import data as data_lib  # pylint: disable=g-import-not-at-top
  sets = data_lib.eval_sets(config.data, task=config.task)
  if config.task == "sbir":  # labels are the photo ids
    named = [("photos", "photo_{label:03d}.png", sets["gallery"]),
             ("sketches", "sketch_{i:03d}_of_photo_{label:03d}.png", sets["query"])]
  else:
    named = [(name, "image_{i:04d}_class_{label:03d}.png", sets[name])
             for name in ("query", "gallery") if sets[name] is not None]
  written = []
  for sub, pattern, image_set in named:
    directory = paths.as_path(folder) / sub
    directory.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(np.asarray(image_set["images"]),
                                           image_set["labels"])):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")
      target = directory / pattern.format(i=i, label=int(label))
      target.write_bytes(png.getvalue())
      written.append(os.fspath(target))
  return written
