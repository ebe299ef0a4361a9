"""Random-access sources: the embedded synthetic set and prepared TFDS sets.

A source is a sequence of records with `len(source)`, `source.image(i)`
(uint8 [H, W, 3|1]), `source.lazy_image(i)` (what transforms take: the
array, or for stored files the file opened but not decoded, so a crop
decodes only what it needs) and `source.field(name)` (an int array over all
records, e.g. `label`, `photo_id`, `category`). `open_splits` returns one source per
split, so the pipeline runs the same code on synthetic and on real data.

Real data sets are the TFDS data sets built by `data_prep` (ArrayRecord
format, read with `tfds.data_source`); tensorflow_datasets is imported only
when one is opened.
"""
import functools
import os

import numpy as np

from jaxdml import extras
from jaxdml import paths
from jaxdml.config import datasets
from jaxdml.data import synthetic

SYNTHETIC = datasets.SYNTHETIC
# kind -> its splits: "sbir" (sketch/photo splits), "same" (train/test, the
# test set is both query and gallery), "query_gallery" (train/query/gallery).
SPLITS = datasets.KINDS


class ArraySource:
  """In-memory records: images [N, H, W, C] plus int fields [N]."""

  def __init__(self, images, **fields):
    self._images = images
    self._fields = {k: np.asarray(v, np.int32) for k, v in fields.items()}
    for k, v in self._fields.items():
      if len(v) != len(images):
        raise ValueError(f"field {k!r} has {len(v)} rows, images have {len(images)}.")

  def __len__(self):
    return len(self._images)

  def image(self, i):
    return self._images[i]

  def lazy_image(self, i):
    """What transforms take (`augment`): here the array itself."""
    return self._images[i]

  def images(self):
    """All images as one array (only in-memory sources have this)."""
    return self._images

  def field(self, name):
    if name not in self._fields:
      raise KeyError(f"source has no field {name!r}; it has {sorted(self._fields)}.")
    return self._fields[name]


class ConcatSource:
  """Several sources read as one: rows of the first, then of the second, ..."""

  def __init__(self, *parts):
    self._parts = parts
    self._starts = np.cumsum([0] + [len(p) for p in parts])

  def __len__(self):
    return int(self._starts[-1])

  def _locate(self, i):
    part = int(np.searchsorted(self._starts, i, side="right")) - 1
    return self._parts[part], int(i) - int(self._starts[part])

  def image(self, i):
    source, row = self._locate(i)
    return source.image(row)

  def lazy_image(self, i):
    source, row = self._locate(i)
    return source.lazy_image(row)

  def field(self, name):
    return np.concatenate([p.field(name) for p in self._parts])

  def in_memory(self):
    return all(isinstance(p, ArraySource) for p in self._parts)

  def images(self):
    return np.concatenate([p.images() for p in self._parts])


class TfdsSource:
  """One split of a prepared TFDS data set, read lazily with `tfds.data_source`."""

  def __init__(self, name, split, data_dir):
    self.name, self.split, self.data_dir = name, split, data_dir

  def __getstate__(self):
    # Open readers stay behind: a worker process reopens the files itself,
    # from the file list resolved here, with array_record's reader alone:
    # no TFDS (~55 MB) and, with `tf_example`, no TensorFlow (~470 MB and
    # ~3 s in every worker; docs/benchmarks.md).
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir,
            "_records": self._records}

  @functools.cached_property
  def _ds(self):
    tfds = extras.require("tensorflow_datasets", "a prepared TFDS data set")
    return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)

  @functools.cached_property
  def _encoded(self):
    # The same records with the image left as its encoded file.
    tfds = extras.require("tensorflow_datasets", "a prepared TFDS data set")
    return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})

  @functools.cached_property
  def _records(self):
    # The split's serialized Examples, from array_record's own data source
    # (what TFDS's wraps; it pickles as its file list).
    return self._encoded.data_source

  @functools.cached_property
  def _meta(self):
    # The integer scalar features (labels for the samplers), in one pass over
    # the records parsed by `tf_example`: 35 against 106 us a 47 KB record
    # through TFDS's feature decoding, 15 against 82 us a 4 KB sketch; at
    # SOP's 120k records, start-up saves ~8 s (docs/benchmarks.md). Which
    # features: the data set's own spec, as TFDS decodes them.
    from jaxdml.data import tf_example  # pylint: disable=g-import-not-at-top
    features = self._encoded.dataset_info.features
    keys = [k for k, f in features.items()
            if getattr(f, "shape", None) == () and np.issubdtype(f.np_dtype, np.integer)]
    return {k: v.astype(np.int32)
            for k, v in tf_example.int64_scalars(self._records, keys).items()}

  def __len__(self):
    return len(self._ds)

  def image(self, i):
    return np.asarray(self._ds[int(i)]["image"])

  def lazy_image(self, i):
    """The stored file, not decoded (`augment.EncodedImage`): a transform
    decodes only what its crop needs (JPEG DCT scaling, and only the crop's
    rectangle: `augment.decoded_crop`)."""
    from jaxdml.data import augment  # pylint: disable=g-import-not-at-top
    return augment.EncodedImage(self.encoded_image(i))

  def encoded_image(self, i) -> bytes:
    """Record i's stored image file. The record is parsed by protobuf's C
    implementation alone (`tf_example`, no TensorFlow): TFDS's feature
    decoding of the same record cost 4x as much, all of it holding the GIL
    (docs/benchmarks.md)."""
    from jaxdml.data import tf_example  # pylint: disable=g-import-not-at-top
    return tf_example.feature_bytes(self._records[int(i)], "image")

  def field(self, name):
    if name not in self._meta:
      raise KeyError(f"{self.name}/{self.split} has no integer field {name!r}; it has "
                     f"{sorted(self._meta)}.")
    return self._meta[name]


def canonical_name(name):
  """`sop` / `jaxdml_sop` -> `jaxdml_sop` (a `/config` suffix is kept, e.g.
  `deepfashion2/crop`); the synthetic set keeps its name."""
  if name == SYNTHETIC:
    return name
  _, sep, config = name.partition("/")
  return datasets.get(name).tfds_name + sep + config


def kind(name):
  """"sbir", "same" or "query_gallery" (the synthetic set is "sbir")."""
  return datasets.kind(name)


def resolve_data_dir(data_dir):
  """The TFDS data dir: the argument, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(str(data_dir or os.environ.get("TFDS_DATA_DIR")
                            or os.path.join("~", "tensorflow_datasets")))


def _check_prepared(name, data_dir):
  from etils import epath  # pylint: disable=g-import-not-at-top  (tfds's path library: GCS too)
  paths.check_reachable(data_dir, "data.data_dir")  # a missing bucket: say so, not "not prepared"
  root = epath.Path(data_dir) / name
  found = root.exists() and any(root.glob("*/dataset_info.json"))
  if not found:
    short = name[len("jaxdml_"):].partition("/")[0]
    raise FileNotFoundError(
        f"TFDS data set {name!r} is not prepared in data_dir {data_dir!r} (looked for "
        f"{data_dir}/{name}/<version>/dataset_info.json). The data cannot be downloaded by jaxdml: "
        f"download {short} by hand, then build it with\n"
        f"  python -m jaxdml.data_prep.build {short} --manual_dir=/path/to/your/download "
        f"--data_dir={data_dir}\n"
        f"and pass the same data_dir (config.data.data_dir). For a run with no download, "
        f"use the embedded data: a config's `:demo` or `:smoke` argument (e.g. "
        f"configs/...py:demo), or data.name='{SYNTHETIC}'.")


def synthetic_splits(cache_dir=None, **generate_kwargs):
  """The embedded set as Sketchy-style splits (photo_id = global photo row)."""
  d = synthetic.load_or_generate(cache_dir, **generate_kwargs)
  out = {}
  for split_id, split in enumerate(("train", "test")):
    rows = np.flatnonzero(d["photo_split"] == split_id)
    out[f"{split}_photos"] = ArraySource(d["photos"][rows], photo_id=rows,
                                         category=d["photo_category"][rows])
    sk = np.flatnonzero(np.isin(d["sketch_photo"], rows))
    out[f"{split}_sketches"] = ArraySource(d["sketches"][sk], photo_id=d["sketch_photo"][sk],
                                           category=d["sketch_category"][sk])
  return out


def open_splits(name, *, data_dir=None, cache_dir=None, synthetic_kwargs=None):
  """All splits of a data set as `{split: source}` (see `SPLITS[kind(name)]`)."""
  name = canonical_name(name)
  if name == SYNTHETIC:
    return synthetic_splits(cache_dir, **dict(synthetic_kwargs or {}))
  data_dir = resolve_data_dir(data_dir)
  _check_prepared(name, data_dir)
  return {s: TfdsSource(name, s, data_dir) for s in SPLITS[kind(name)]}
