"""Grain input pipelines: training batches and evaluation sets.

One code path for every data set: `sources.open_splits` turns the embedded
synthetic set and the prepared TFDS sets alike into random-access sources;
samplers pick rows as pure functions of (seed, step); each batch is made
whole, by a worker process (`worker_processes`) or a thread of grain's pool.
The batch for step `s` therefore depends only on `(seed, s)` (and the data
config): resuming at `start_step=s` replays an uninterrupted run exactly,
whatever the thread count or process count.

Images leave the pipeline as uint8; `jaxdml.data.normalize` runs on device.
"""
import functools
import math

import numpy as np

from jaxdml import extras
from jaxdml import host
from jaxdml.config import default_data_config  # pylint: disable=unused-import  (re-exported)
from jaxdml.config import get as _get
from jaxdml.data import augment
from jaxdml.data import samplers
from jaxdml.data import seeding
from jaxdml.data import sources
from jaxdml.data import synthetic
from jaxdml.data.workers import processes as worker_processes
from jaxdml.data.workers import shared_batches

_AUG = 201  # RNG stream tag of the augmentations
_NUM_STEPS = 2**40  # the iterator is endless in practice


# Memory one worker process is allowed on the default layout: it holds
# ~0.1 GB (~0.2 GB for RAML's 448 px views, with its shared-memory batches)
# and buffers batches of its own; the rest is headroom.
WORKER_MEMORY_BYTES = 1 << 30


def worker_layout(data_config) -> tuple[int, int]:
  """`(worker processes, threads in each)` for this host's training batches
  (0 processes: the threads run in the training process).

  `data.num_workers` -1 (the default) picks one single-threaded worker per
  core this process may use: independent processes keep images/s per core
  flat, where two threads in one process lose ~8-12 % a core to the GIL
  (docs/benchmarks.md). Where memory is short, fewer workers share the
  cores: one per `WORKER_MEMORY_BYTES` of available memory, at least 2.
  One core, or the embedded synthetic set (in memory: every worker would
  get a pickled copy, and its crops are cheap), keeps the threads in this
  process. `data.num_threads` 0 (the default) is one thread per core of a
  process's share, at most 32 (each thread makes whole batches; more
  threads than cores measured slower).
  """
  cores = host.cores()
  workers = int(_get(data_config, "num_workers", -1))
  if workers < 0:
    name = sources.canonical_name(_get(data_config, "name", sources.SYNTHETIC))
    if cores == 1 or name == sources.SYNTHETIC:
      workers = 0
    else:  # memory is read only where workers may start
      workers = min(cores, max(2, host.available_memory_bytes() // WORKER_MEMORY_BYTES))
  threads = int(_get(data_config, "num_threads", 0) or 0)
  if threads <= 0:
    threads = min(32, max(1, cores // max(1, workers)))
  return workers, threads


def num_threads(data_config) -> int:
  """Threads for work this process does itself (evaluation, indexing):
  `data.num_threads`, else one per core, at most 32."""
  threads = int(_get(data_config, "num_threads", 0) or 0)
  return threads if threads > 0 else min(32, host.cores())


def _open(data_config):
  return sources.open_splits(
      _get(data_config, "name", sources.SYNTHETIC), data_dir=_get(data_config, "data_dir"),
      cache_dir=_get(data_config, "cache_dir"), synthetic_kwargs=_get(data_config, "synthetic", {}))


def _single_split(data_config, splits):
  """(train source, its labels) for the single-tower task.

  Sketch/photo sets (synthetic, Sketchy) train on their train photos with
  *category* labels, or with `single_labels="instance"` on photos and
  sketches together, one class per photo (like SOP: many small classes).
  """
  if sources.kind(_get(data_config, "name", sources.SYNTHETIC)) == "sbir":
    source, label = _sketch_photo_single(data_config, splits, "train")
    return source, source.field(label)
  return splits["train"], splits["train"].field("label")


def num_classes(data_config, *, task: str) -> int:
  """Classes of the training labels (largest label + 1): the rows a loss with
  one learnable vector per class (a proxy table) needs."""
  if task != "single":
    raise ValueError(f"learnable per-class loss parameters need task 'single', not {task!r}.")
  _, labels = _single_split(data_config, _open(data_config))
  return int(np.max(labels)) + 1


def _sketch_photo_single(data_config, splits, split):
  """(source, label field) of a sketch/photo set used by one encoder."""
  labels = _get(data_config, "single_labels", "category")
  if labels == "category":
    return splits[f"{split}_photos"], "category"
  if labels == "instance":
    return sources.ConcatSource(splits[f"{split}_photos"], splits[f"{split}_sketches"]), "photo_id"
  raise ValueError(f"config.data.single_labels={labels!r}: expected 'category' or 'instance'.")


def _augment_kwargs(data_config):
  a = _get(data_config, "augment", {}) or {}
  return {"random_resized_crop": bool(_get(a, "random_resized_crop", True)),
          "scale": tuple(_get(a, "scale", (0.2, 1.0))),
          "ratio": tuple(_get(a, "ratio", (3 / 4, 4 / 3))),
          "flip": bool(_get(a, "flip", True)),
          "color_jitter": _get(a, "color_jitter", None),
          "resize_square": _get(a, "resize_square", None)}


def _sbir_plan(data_config, splits, batch_size, seed):
  photos, sketches = splits["train_photos"], splits["train_sketches"]
  ids = photos.field("photo_id")
  sorter = np.argsort(ids)
  sk_ids = sketches.field("photo_id")
  pos = np.minimum(np.searchsorted(ids, sk_ids, sorter=sorter), len(ids) - 1)
  sk_rows = sorter[pos]
  if np.any(ids[sk_rows] != sk_ids):
    bad = np.unique(sk_ids[ids[sk_rows] != sk_ids])[:5]
    raise ValueError(f"train sketches refer to photo ids missing from train_photos (e.g. "
                     f"{bad.tolist()}); rebuild the data set.")
  groups = samplers.group_rows(sk_rows, len(ids))
  eligible = np.flatnonzero(groups[2] > 0)  # photos without sketches cannot pair
  size, aug = _get(data_config, "image_size"), _augment_kwargs(data_config)
  flip = aug.pop("flip")

  def indices(step):
    return samplers.pair_batch_indices(eligible, groups, batch_size=batch_size, seed=seed, step=step)

  def example(idx, row, rng, rows=None):
    p, s = idx[0][row], idx[1][row]
    # One flip for the pair: the instance's pose must match across modalities.
    # Both crops render into their rows, flipped there: flipping afterwards
    # and copying the mirrored arrays in cost ~0.3 ms a pair (docs/benchmarks.md).
    flipped = flip and rng.random() < 0.5
    photo = augment.train_transform(photos.lazy_image(p), rng, size=size, mirror=flipped,
                                    out=None if rows is None else rows["photo"], **aug)
    sketch = augment.train_transform(sketches.lazy_image(s), rng, size=size, mirror=flipped,
                                     out=None if rows is None else rows["sketch"], **aug)
    return {"sketch": sketch, "photo": photo, "label": np.int32(ids[p])}

  return indices, example, STACK


def _single_plan(data_config, splits, batch_size, seed):
  source, labels = _single_split(data_config, splits)
  indices = samplers.from_spec(_get(data_config, "sampler"), labels, batch_size=batch_size,
                               seed=seed, m_per_class=_get(data_config, "m_per_class", 4),
                               field=source.field).batch
  size, aug, views = _get(data_config, "image_size"), _augment_kwargs(data_config), _get(data_config, "views")

  if views:
    # Without hi and lo, views at image_size: two-view losses (vicreg).
    num = int(views["num"])
    hi = int(_get(views, "hi", None) or size)
    lo = int(_get(views, "lo", None) or hi)
    mixup = float(_get(views, "mixup", 0.0) or 0.0)
    aug.pop("random_resized_crop")
    if aug.pop("resize_square"):
      raise ValueError("data.augment.resize_square does not apply to views (RAML crops each "
                       "view with a random resized crop); set it to None.")

    if _get(views, "on_device", True):
      return indices, _device_views_example(source, labels, num, hi, mixup, aug), CONCATENATE

    def example(idx, row, rng, rows=None):
      del rows  # the batch copies the views in
      i = idx[row]
      image_hi, image_lo = augment.coupled_views(source.lazy_image(i), rng, num_views=num, hi=hi, lo=lo, **aug)
      if mixup > 0:
        # RAML mixes every view with a view of another image drawn for that
        # view (pavelsuma/raml draws a partner per view), by the same amount
        # at both resolutions; its loss has no labels to mix.
        partners = [augment.coupled_views(source.lazy_image(int(rng.integers(len(source)))), rng,
                                          num_views=1, hi=hi, lo=lo, **aug) for _ in range(num)]
        other = [np.concatenate(side) for side in zip(*partners)]
        lam = rng.beta(mixup, mixup, size=(num, 1, 1, 1))
        image_hi, image_lo = (augment.blend(a, b, lam) for a, b in zip((image_hi, image_lo), other))
      return {"image_hi": image_hi, "image_lo": image_lo, "label": np.full(num, labels[i], np.int32)}

    return indices, example, CONCATENATE  # views of an image stay contiguous

  def example(idx, row, rng, rows=None):  # pylint: disable=function-redefined
    i = idx[row]
    image = augment.train_transform(source.lazy_image(i), rng, size=size,
                                    out=None if rows is None else rows["image"], **aug)
    return {"image": image, "label": np.int32(labels[i])}

  return indices, example, STACK


def _device_views_example(source, labels, num, hi, mixup, aug):
  """RAML's coupled views with the pixel work left to the train step
  (`device_augment`): the same draws as the host version, hi crops only."""
  def example(idx, row, rng, rows=None):
    i = idx[row]
    crops, order, factors = augment.coupled_crops(
        source.lazy_image(i), rng, num_views=num, hi=hi,
        out=None if rows is None else rows[augment.CROPS], **aug)
    out = {augment.CROPS: crops, augment.ORDER: order, augment.FACTORS: factors,
           "label": np.full(num, labels[i], np.int32)}
    if mixup > 0:
      # Each partner's crop is rendered into its row of the batch.
      out[augment.PARTNER_CROPS] = (np.empty((num, hi, hi, 3), np.uint8) if rows is None
                                    else rows[augment.PARTNER_CROPS])
      partners = [augment.coupled_crops(source.lazy_image(int(rng.integers(len(source)))), rng,
                                        num_views=1, hi=hi, out=out[augment.PARTNER_CROPS][v:v + 1],
                                        **aug)[1:] for v in range(num)]
      out[augment.PARTNER_ORDER], out[augment.PARTNER_FACTORS] = (
          np.concatenate(part) for part in zip(*partners))
      out[augment.MIXUP] = rng.beta(mixup, mixup, size=num).astype(np.float32)
    return out

  return example


def train_batches(data_config, *, seed, global_batch_size, start_step, process_index=0,
                  process_count=1, task):
  """Per-process training batches for steps start_step, start_step + 1, ...

  Args:
    data_config: `default_data_config()`-like ConfigDict or dict.
    seed: data seed; the batch for step s is a pure function of (seed, s).
    global_batch_size: examples per step over all processes. With
      `data_config.views` it counts *images*; each yields `views.num` rows.
    start_step: first step to produce (resume at s: pass s).
    process_index, process_count: this process takes rows
      `[p*B/n, (p+1)*B/n)` of each global batch.
    task: "sbir" -> `{"sketch", "photo", "label"}` (label: photo id; pairs
      of distinct photos), or "single" -> `{"image", "label"}` (batches of
      `data.sampler`, m-per-class by default) or, with views,
      `{"image_hi", "image_lo", "label"}` with the
      `views.num` views of an image in consecutive rows; with
      `views.on_device` (the default) the hi crops and their parameters
      instead (`device_augment.KEYS`), which `tasks.device_views` turns into
      `image_hi` and `image_lo` inside the train step.

  Returns:
    an iterator of dicts of numpy arrays (uint8 images, int32 labels).
  """
  if task not in ("sbir", "single"):
    raise ValueError(f"task must be 'sbir' or 'single'; got {task!r}.")
  name = _get(data_config, "name", sources.SYNTHETIC)
  if task == "sbir" and sources.kind(name) != "sbir":
    raise ValueError(f"task 'sbir' needs a sketch/photo data set ({sources.SYNTHETIC!r} or "
                     f"'jaxdml_sketchy'); got {name!r}.")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}.")
  splits = _open(data_config)
  plan = _sbir_plan if task == "sbir" else _single_plan
  indices, example, collate = plan(data_config, splits, global_batch_size, seed)
  b = global_batch_size // process_count
  cached_indices = _RecentSteps(indices)
  cached_indices(start_step)  # sampler errors (batch too big, ...) raise here, not in a worker

  global_rows = process_index * b + np.arange(b)  # augmentation ignores the process layout

  def generators(step):
    # Row r of step s draws from default_rng([seed, _AUG, s, r]), made for all rows at once.
    return seeding.row_generators([seed, _AUG, step], global_rows)

  def make(step, j, rng, rows=None):
    return example(cached_indices(step), int(global_rows[j]), rng, rows)

  workers, threads = worker_layout(data_config)
  prefetch = int(_get(data_config, "prefetch", 2))
  # A worker process renders each batch straight into shared memory it
  # reuses, and sends its name: no copy and no fresh pages on either side.
  shared = _SHARED_MIN_BYTES if workers else None
  make_batch = functools.partial(_make_batch, make, generators, concatenate=collate == CONCATENATE,
                                 shared_min_bytes=shared)
  if not workers:
    # Imported here: training on accelerators without grain still benchmarks.
    grain = extras.require("grain", "the data pipeline")
    # Each thread makes whole batches (steps s, s + threads, ...): grain's
    # per-element machinery cost ~30 % of the CPU when threads shared one
    # batch's examples (docs/benchmarks.md).
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, prefetch))
    return iter(grain.MapDataset.range(start_step, _NUM_STEPS).map(make_batch)
                .to_iter_dataset(read))
  # As many idle mappings as the workers' pools keep free segments.
  mappings = shared_batches.Mappings(max_idle=workers * shared_batches.MAX_IDLE)
  return worker_processes.WorkerBatches(make_batch, workers, threads=threads,
                                        start_step=start_step, prefetch=prefetch,
                                        receive=mappings.open_arrays)


STACK, CONCATENATE = "stack", "concatenate"  # how a plan's examples form a batch


# Arrays a worker process renders straight into shared memory; smaller ones
# (labels) are cheaper pickled than given a shared-memory segment each.
_SHARED_MIN_BYTES = 1 << 20


def _in_shared_memory(nbytes, shared_min_bytes) -> bool:
  """Whether a batch array of `nbytes` lives in the worker's recycled shared
  memory (`shared_batches`), which the training process maps by name
  instead of receiving a copy: in a worker process (`shared_min_bytes`
  set), arrays of at least that size."""
  return shared_min_bytes is not None and nbytes >= shared_min_bytes


def _batch_array(shape, dtype, shared_min_bytes):
  if _in_shared_memory(math.prod(shape) * np.dtype(dtype).itemsize, shared_min_bytes):
    return shared_batches.worker_pool().array(shape, dtype)
  return np.empty(shape, dtype)


def _make_batch(make, generators, step, *, concatenate, shared_min_bytes=None):
  """The batch of `step`: its examples rendered into one array per key.

  `generators(step)` gives one generator per example (row j's is `rng`
  below). The first example gives the shapes; the rest are made straight
  into their rows (`make(step, j, rng, rows)`: a crop renders into its row,
  anything else is copied in). This takes the place of stacking: a new
  array per crop and a stacked copy cost ~40 us and ~37 page faults an
  image (docs/benchmarks.md).
  With `concatenate`, each example's leading axis (RAML's views) joins the
  batch axis.
  """
  if shared_min_bytes is not None:  # in a worker process
    shared_batches.exit_with_parent()
  rngs = generators(step)
  b = len(rngs)
  first = make(step, 0, rngs[0])
  batch = {k: _batch_array((b,) + np.shape(v), np.asarray(v).dtype, shared_min_bytes)
           for k, v in first.items()}
  try:
    for j in range(b):
      rows = {k: v[j, ...] for k, v in batch.items()}  # views; 0-d for scalars
      made = first if j == 0 else make(step, j, rngs[j], rows)
      for k, v in made.items():
        if v is not rows[k]:
          rows[k][...] = v
  except BaseException:
    for v in batch.values():  # a failed batch's shared memory is not handed on: free it
      if _in_shared_memory(v.nbytes, shared_min_bytes):
        shared_batches.worker_pool().release(v)
    raise
  if concatenate:
    batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
  if shared_min_bytes is not None:  # in a worker: sent by name, `shared_batches.Mappings` maps it
    batch = {k: shared_batches.worker_pool().handle(v)
             if _in_shared_memory(v.nbytes, shared_min_bytes) else v for k, v in batch.items()}
  return batch


class _RecentSteps:
  """`indices(step)` remembered for the last steps: each batch's rows ask for
  the same step, from several threads. A plain class with a lock, not
  `functools.lru_cache`, so the pipeline pickles into the worker
  processes (each starts with an empty cache and its own lock)."""

  def __init__(self, indices, keep: int = 256):
    self.__setstate__({"_indices": indices, "_keep": keep})

  def __call__(self, step):
    with self._lock:
      if step not in self._cache:
        if len(self._cache) >= self._keep:
          self._cache.pop(next(iter(self._cache)))
        self._cache[step] = self._indices(step)
      return self._cache[step]

  def __getstate__(self):
    return {"_indices": self._indices, "_keep": self._keep}

  def __setstate__(self, state):
    import threading  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state, _cache={}, _lock=threading.Lock())


class LazyImages:
  """Array-like eval images decoded and transformed on access.

  Supports `len`, `.shape`, `.dtype`, integer/slice/array indexing (which
  return numpy arrays) and `np.asarray` (decodes everything). Keeps large
  real test sets (e.g. SOP's 60k images) out of memory until batched.
  """

  def __init__(self, source, transform, size, num_threads=8):
    self._source, self._transform, self._threads = source, transform, num_threads
    self.shape, self.dtype = (len(source), size, size, 3), np.dtype(np.uint8)

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      return self._transform(self._source.lazy_image(int(key)))
    rows = np.arange(len(self))[key]
    from concurrent import futures  # pylint: disable=g-import-not-at-top
    with futures.ThreadPoolExecutor(self._threads) as pool:
      out = list(pool.map(lambda i: self._transform(self._source.lazy_image(int(i))), rows))
    return np.stack(out) if out else np.zeros((0,) + self.shape[1:], np.uint8)

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out.astype(dtype) if dtype is not None else out


def _eval_images(source, size, threads):
  if isinstance(source, sources.ArraySource) or (
      isinstance(source, sources.ConcatSource) and source.in_memory()):
    images = source.images()
    if images.shape[1:3] == (size, size):  # the synthetic set is made at size
      return images
    # Synthetic images are whole objects: resize, no 8/7 crop.
    return np.stack([augment.resize_center_crop(im, size=size) for im in images])
  return LazyImages(source, functools.partial(augment.eval_transform, size=size), size, threads)


EVAL_SPLITS = ("test", "train")


def eval_sets(data_config, *, task, image_size=None, split="test"):
  """Query and gallery sets for evaluation.

  Returns `{"query": q, "gallery": g}` with each `{"images": uint8
  [N, S, S, 3] (numpy, or `LazyImages` for TFDS sets), "labels": int32 [N],
  "categories": int32 [N]}`; `gallery` is None when the query set is its own
  gallery (leave-one-out: CUB, Cars196, SOP; synthetic in single mode).
  SBIR: queries are the test sketches, labels = photo id (hit = own photo),
  categories = class; the gallery is the test photos. Real images get the
  eval transform (shorter side to S*8/7, centre crop); `image_size`
  overrides `data_config.image_size` (e.g. RAML's 448 px database side).
  `split="train"` evaluates on the training images instead (a query/gallery
  set's train split, leave-one-out).
  """
  if task not in ("sbir", "single"):
    raise ValueError(f"task must be 'sbir' or 'single'; got {task!r}.")
  if split not in EVAL_SPLITS:
    raise ValueError(f"evaluation split {split!r}: expected one of {EVAL_SPLITS}.")
  name = _get(data_config, "name", sources.SYNTHETIC)
  kind = sources.kind(name)
  if task == "sbir" and kind != "sbir":
    raise ValueError(f"task 'sbir' needs a sketch/photo data set; got {name!r}.")
  size = int(image_size or _get(data_config, "image_size"))
  threads = num_threads(data_config)
  splits = _open(data_config)

  def pack(source, label_field, category_field):
    return {"images": _eval_images(source, size, threads),
            "labels": source.field(label_field).astype(np.int32),
            "categories": source.field(category_field).astype(np.int32)}

  if kind == "sbir":
    if task == "sbir":
      return {"query": pack(splits[f"{split}_sketches"], "photo_id", "category"),
              "gallery": pack(splits[f"{split}_photos"], "photo_id", "category")}
    source, label = _sketch_photo_single(data_config, splits, split)
    return {"query": pack(source, label, "category"), "gallery": None}
  if kind == "same" or split == "train":
    return {"query": pack(splits[split], "label", "label"), "gallery": None}
  return {"query": pack(splits["query"], "label", "label"),
          "gallery": pack(splits["gallery"], "label", "label")}
