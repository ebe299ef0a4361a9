"""An index of a folder of images that `jaxdml.apps.search_images` searches.

    model = embedder.from_workdir("workdirs/demo")
    index = image_index.build_index(model, "photos/", "photos.index")
    index = image_index.load_index("photos.index")
    scores, rows = image_index.search_index(index, model, queries, k=10)
    index.path_of(rows[0, 0])                   # the best match of query 0

INDEX/ (a local folder or a URL) holds
- `embeddings.npy`: float32 [N, D], as the model outputs them;
- `files.json`: the images folder and each file's path in it, sorted;
- `manifest.json`: format, the model (workdir or export, and step), its
  config, image size, tower, similarity, dim, count, backend ("exact", or
  "scann" with its settings) and the model's probe embeddings (below);
- `scann/`: the serialized ScaNN searcher, backend "scann" only.
It is written in a temporary folder and renamed into place (a URL: uploaded,
the manifest last), so an interrupted build never leaves an index that loads.

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
import shutil
import tempfile

import numpy as np

from jaxdml import extras
from jaxdml import paths
from jaxdml.apps.embedder import Embedder, describe, load_image

FORMAT = 1
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROBE_ROWS = 4
# Float rounding (another device count, TF instead of XLA) moves cosines by
# ~1e-6; another model's embeddings are far below this.
PROBE_MIN_COSINE = 0.999
# ScaNN's re-scoring depth is set at build time for this many neighbours.
SCANN_BUILD_K = 100
# Neighbours per image the build-time recall audit checks.
AUDIT_K = 10


class ModelMismatchError(ValueError):
  """The query model is not the one the index was made with."""


@dataclasses.dataclass
class Index:
  """A loaded index; `searcher` is ScaNN's (backend "scann") or None."""
  path: str
  manifest: dict
  embeddings: np.ndarray
  folder: str
  files: list
  searcher: object = None

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


def embed_files(model: Embedder, folder, files, *, tower="gallery", batch_size=256,
                threads=None, progress=True) -> np.ndarray:
  """float32 [N, D] embeddings of `folder`'s `files`, batch by batch; the
  next batch decodes (in a thread pool) while this one is embedded."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from jaxdml.data import pipeline  # pylint: disable=g-import-not-at-top
  chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
  outputs = []
  with futures.ThreadPoolExecutor(threads or pipeline.num_threads(model.config.data)) as pool, \
      tqdm.tqdm(total=len(files), desc="embed", unit="image", disable=not progress,
                dynamic_ncols=True) as bar:
    submit = lambda chunk: [pool.submit(load_image, paths.join(folder, f), model.image_size)
                            for f in chunk]
    pending = submit(chunks[0])
    for i in range(len(chunks)):
      ready, pending = pending, submit(chunks[i + 1]) if i + 1 < len(chunks) else []
      outputs.append(model.embed(tower, np.stack([f.result() for f in ready])))
      bar.update(len(ready))
  return np.concatenate(outputs)


def build_index(model: Embedder, images, out, *, tower="gallery", batch_size=256,
                backend="auto", similarity="cosine", scann_config=None, threads=None,
                progress=True) -> Index:
  """Embeds every image in the folder `images` with `model`'s `tower` and
  writes the index to `out` (replacing an index there). `backend` "auto" is
  exact search below `scann_backend.BRUTE_FORCE_BELOW` images, ScaNN above.
  Returns the index, as `load_index(out)` would."""
  from jaxdml.retrieval import exact, scann_backend  # pylint: disable=g-import-not-at-top
  if backend not in ("auto", "exact", "scann"):
    raise ValueError(f"backend={backend!r}: expected 'auto', 'exact' or 'scann'.")
  if similarity not in exact.SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}: expected one of {exact.SIMILARITIES}.")
  _check_replaceable(out)
  files = list_images(images)
  embeddings = embed_files(model, images, files, tower=tower, batch_size=batch_size,
                           threads=threads, progress=progress)
  if backend == "auto":
    backend = "scann" if len(files) >= scann_backend.BRUTE_FORCE_BELOW else "exact"
  searcher, settings = None, None
  if backend == "scann":
    settings = scann_backend.resolve_config(len(files), min(SCANN_BUILD_K, len(files)),
                                            similarity, scann_config)
    prepared = exact.prepare(embeddings, similarity)
    searcher = scann_backend.build_searcher(prepared, min(SCANN_BUILD_K, len(files)),
                                            similarity=similarity, config=settings)
    if not settings["brute_force"] and int(settings["audit_sample"]) > 0:
      searcher, settings = _audited(searcher, prepared, settings, similarity)
      backend = "exact" if searcher is None else backend
  manifest = {
      "format": FORMAT, "model": model.source, "config": json.loads(model.config.to_json()),
      "image_size": model.image_size, "tower": tower, "similarity": similarity,
      "dim": int(embeddings.shape[1]), "count": len(files), "backend": backend,
      "scann_config": settings,
      "probe": model.embed(tower, probe_images(model.image_size)).tolist()}
  folder = paths.join(images)
  _write(out, manifest, embeddings, {"folder": folder, "files": files}, searcher)
  return Index(path=paths.join(out), manifest=manifest, embeddings=embeddings, folder=folder,
               files=files, searcher=searcher)


def _audited(searcher, prepared, settings, similarity):
  """The searcher and its settings deepened until a sample of the indexed
  images, used as queries, finds its exact 10 nearest neighbours as the
  target asks (`scann_backend.audit`); (None, settings) where no setting
  meets it: the index then searches exactly."""
  from jaxdml.retrieval import scann_backend  # pylint: disable=g-import-not-at-top
  k = min(AUDIT_K, len(prepared) - 1) + 1  # + the image itself
  chosen = scann_backend.audit(searcher, prepared, prepared, k, exclude_self=True,
                               similarity=similarity, config=settings)
  settings = {**settings, "audit": chosen["report"]}
  if chosen["leaves"] is None:
    print(f"ScaNN misses the recall target even searching every leaf ({chosen['report']}): "
          "this index searches exactly.")
    return None, settings
  settings.update(num_leaves_to_search=chosen["leaves"],
                  reorder_k=max(chosen["reorder_k"], settings["reorder_k"]))
  return searcher, settings


def _check_replaceable(out) -> None:
  """An existing `out` is replaced only when it is an index (or empty):
  never someone's folder of photos."""
  target = paths.as_path(out)
  if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
    raise FileExistsError(f"--out={out} exists and is not an index (no {MANIFEST}); "
                          "pick a new folder, or remove it first.")


def _write(out, manifest, embeddings, files, searcher) -> None:
  remote = paths.is_url(out)
  local = os.fspath(paths.as_path(out))
  tmp = tempfile.mkdtemp(prefix="jaxdml-index-") if remote else f"{local}.tmp-{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  try:
    np.save(os.path.join(tmp, "embeddings.npy"), embeddings.astype(np.float32))
    with open(os.path.join(tmp, "files.json"), "w") as f:
      json.dump(files, f, indent=1)
    if searcher is not None:
      os.makedirs(os.path.join(tmp, "scann"))
      # Relative asset paths: the folder is renamed or uploaded after this.
      searcher.serialize(os.path.join(tmp, "scann"), relative_path=True)
    text = json.dumps(manifest, indent=2)
    if remote:
      paths.upload_tree(tmp, out, replace=True)
      (paths.as_path(out) / MANIFEST).write_text(text)  # last: the index is complete
      return
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      f.write(text)
    # The old index steps aside, the new one takes its place, then the old
    # one goes: a run killed in between leaves one of them whole.
    old = f"{local}.old-{os.getpid()}"
    if os.path.exists(local):
      os.rename(local, old)
    try:
      os.rename(tmp, local)
    except BaseException:
      if os.path.exists(old):
        os.rename(old, local)
      raise
    shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def load_index(path) -> Index:
  """The index `build_index` wrote at `path` (a folder or a URL)."""
  manifest_path = paths.as_path(path) / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(
        f"{manifest_path} not found: {path} is not an index, or its build was interrupted. "
        "Build it with python -m jaxdml.apps.index_images --workdir=... --images=... --out=...")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is an index of format {manifest.get('format')}; this jaxdml "
                     f"reads format {FORMAT}: rebuild it with python -m jaxdml.apps.index_images.")
  local = paths.LocalCopy(path, download=True)  # numpy and ScaNN read local files
  try:
    embeddings = np.load(os.path.join(local.local, "embeddings.npy"))
    with open(os.path.join(local.local, "files.json")) as f:
      files = json.load(f)
    searcher = None
    if manifest["backend"] == "scann":
      from jaxdml.retrieval import scann_backend  # pylint: disable=g-import-not-at-top
      searcher = scann_backend._import_scann().load_searcher(  # pylint: disable=protected-access
          os.path.join(local.local, "scann"))
  finally:
    local.close()
  return Index(path=paths.join(path), manifest=manifest, embeddings=embeddings,
               folder=files["folder"], files=files["files"], searcher=searcher)


def check_model(index: Index, model: Embedder) -> None:
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


def search_embeddings(index: Index, queries: np.ndarray, k: int = 10):
  """`(scores float32 [Q, k'], rows int64 [Q, k'])` of the index's nearest
  items to `queries` (embeddings), best first; k' = min(k, count)."""
  from jaxdml import retrieval  # pylint: disable=g-import-not-at-top
  from jaxdml.retrieval import exact  # pylint: disable=g-import-not-at-top
  k = min(int(k), len(index.files))
  similarity = index.manifest["similarity"]
  if index.searcher is None:
    return retrieval.search(queries, index.embeddings, k, similarity=similarity)
  settings = index.manifest["scann_config"]
  if not settings["brute_force"] and k > settings["reorder_k"]:
    raise ValueError(f"k={k}: this ScaNN index re-scores {settings['reorder_k']} candidates; "
                     "ask for fewer, or rebuild it with --backend=exact.")
  tree = not settings["brute_force"]  # searched as deep as the build's audit chose
  rows, scores = index.searcher.search_batched(
      exact.prepare(queries, similarity), final_num_neighbors=k,
      leaves_to_search=settings["num_leaves_to_search"] if tree else None,
      pre_reorder_num_neighbors=settings["reorder_k"] if tree else None)
  scores = np.asarray(scores, np.float32)
  # ScaNN returns squared distances for euclidean; scores rank larger-is-better.
  return (-scores if similarity == "euclidean" else scores), np.asarray(rows, np.int64)


def search_index(index: Index, model: Embedder, images: np.ndarray, *, k: int = 10,
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
