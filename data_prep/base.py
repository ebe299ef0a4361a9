"""Pieces every data_prep builder shares: the base builder, image checks,
missing-file errors and the published-count check.

Each builder only parses its official annotation files into rows (plain dicts
with a path under `image`); this module turns the rows into TFDS examples,
checks every image, and records what it skipped.
"""
from __future__ import annotations

import inspect
import io
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

# Formats TFDS decodes the same way with TensorFlow, OpenCV and PIL; anything
# else (GIF, BMP, CMYK or palette images) is re-encoded at build time so that
# every image reads back as uint8 [H, W, 3] whichever decoder grain uses.
_KEPT_FORMATS = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}


class BadImageError(ValueError):
  """An image file of the data set cannot be decoded."""


class MissingFileError(FileNotFoundError):
  """A file the official layout promises is not in the manual directory."""


def require(path: os.PathLike | str, *, layout: str, what: str = "") -> str:
  """Returns `path` as a string, or raises naming it and the expected layout."""
  path = os.fspath(path)
  if not os.path.exists(path):
    what = f" ({what})" if what else ""
    raise MissingFileError(
        f"Missing file{what}: {path}\nExpected layout of --manual_dir:\n"
        f"{layout.strip()}")
  return path


def first_existing(candidates: Sequence[os.PathLike | str], *, layout: str,
                   what: str) -> str:
  """The first of `candidates` that exists; else names them all and the layout.

  Used where the official archives unpack differently depending on the unzip
  tool (an extra top folder or not).
  """
  for path in candidates:
    if os.path.exists(path):
      return os.fspath(path)
  tried = "\n".join(f"  {os.fspath(p)}" for p in candidates)
  raise MissingFileError(
      f"Missing {what}; looked for:\n{tried}\nExpected layout of "
      f"--manual_dir:\n{layout.strip()}")


def find_top(root: str, *, folder: str, marker: str, layout: str) -> str:
  """`root/folder` if it holds `marker`, else `root` if it does; else raises.

  Lets --manual_dir point either at the unpacked folder or at its parent.
  """
  marker_path = first_existing(
      [os.path.join(root, folder, marker), os.path.join(root, marker)],
      layout=layout, what=marker)
  return os.path.dirname(marker_path)


def read_checked_image(path: str) -> bytes:
  """Reads an image file, decodes it fully, and returns encoded bytes.

  JPEG and PNG files in RGB or grayscale are returned byte for byte; other
  formats or modes are converted to RGB and re-encoded (PNG for PNG sources,
  else JPEG quality 95). Raises BadImageError naming the file when it cannot
  be decoded (truncated, corrupt, not an image).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImageError(
        f"Cannot read image {path}: {e}. The annotation files list it; "
        "re-extract the archive, or rerun with --skip_bad_images.") from e
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # full decode: catches truncated files that verify() passes
      if _KEPT_FORMATS.get(img.format, ()) and img.mode in _KEPT_FORMATS[img.format]:
        return data
      fmt = "PNG" if img.format == "PNG" else "JPEG"
      out = io.BytesIO()
      img.convert("RGB").save(out, format=fmt, quality=95)
      return out.getvalue()
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    raise BadImageError(
        f"Cannot decode image {path}: {type(e).__name__}: {e}. Re-download or "
        "re-extract it, or rerun with --skip_bad_images to leave it out.") from e


def shrink_image(data: bytes, max_side: int) -> bytes:
  """The image with its longer side at most `max_side` px (aspect kept).

  Larger images are decoded at the smallest JPEG DCT scale that still covers
  the target, resized with an antialiased bicubic filter and stored as JPEG
  quality 95; images within the limit are returned byte for byte.
  """
  with Image.open(io.BytesIO(data)) as img:
    w, h = img.size
    if max(w, h) <= max_side:
      return data
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft("RGB", size)
    out = io.BytesIO()
    img.convert("RGB").resize(size, Image.BICUBIC).save(out, format="JPEG", quality=95)
  return out.getvalue()


def crop_image(data: bytes, box: Sequence[int]) -> bytes:
  """Crops encoded image bytes to pixel box (x1, y1, x2, y2), clamped; JPEG out."""
  with Image.open(io.BytesIO(data)) as img:
    w, h = img.size
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w, max(x1 + 1, int(box[2]))), min(h, max(y1 + 1, int(box[3])))
    out = io.BytesIO()
    img.convert("RGB").crop((x1, y1, x2, y2)).save(out, format="JPEG", quality=95)
  return out.getvalue()


def check_counts(counts: Mapping[str, int], expected: Mapping[str, int], *,
                 source: str = "published") -> list[str]:
  """Compares split sizes to expected ones; returns one warning per mismatch.

  Keys of `expected` are split names or sums written `a+b` (Sketchy publishes
  its sketch total, not the per-split numbers).
  """
  warnings = []
  for key, want in expected.items():
    got = sum(counts.get(s, 0) for s in key.split("+"))
    if got != want:
      warnings.append(f"WARNING: {key} has {got:,} examples; the {source} "
                      f"number is {want:,} ({got - want:+,}).")
  return warnings


def label_map(keys: Iterable) -> dict:
  """Maps sorted distinct keys to 0..n-1 (deterministic across runs)."""
  return {k: i for i, k in enumerate(sorted(set(keys)))}


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the data_prep builders: the user's own copy in a manual dir.

  Subclasses set `name`, `MANUAL_DOWNLOAD_INSTRUCTIONS` (also shown in
  missing-file errors), `EXPECTED_COUNTS`, `_features()` and `_read_rows(root)`
  returning `{split: [row, ...]}` where each row has a unique `key`, an
  `image` path, and values for every other feature.
  """

  VERSION = tfds.core.Version("1.0.0")
  # Where TFDS reads a builder's metadata files: this folder, which is
  # `data_prep/` in a checkout and `jaxdml/data_prep/` once installed
  # (TFDS would infer it from the module name, wrongly for the first).
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))
  RELEASE_NOTES = {"1.0.0": "First release."}
  EXPECTED_COUNTS: Mapping[str, int] = {}

  def __init__(self, *, skip_bad_images: bool = False, max_side: int | None = None,
               **kwargs):
    self.skip_bad_images = skip_bad_images
    self.max_side = max_side
    self.bad_images: list[str] = []
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports importlib_resources, which neither TFDS nor
    # etils installs on Python 3.11; the file of the class is all it needs.
    return epath.Path(inspect.getfile(cls))

  def _features(self) -> dict:
    raise NotImplementedError

  def _read_rows(self, root: str) -> dict[str, list[dict]]:
    raise NotImplementedError

  def _transform_image(self, data: bytes, row: Mapping) -> bytes:
    """Hook for builders that crop (DeepFashion2); identity by default."""
    del row
    return data

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict(self._features()),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = self._read_rows(root)
    empty = [s for s, rows in splits.items() if not rows]
    if empty:
      raise ValueError(
          f"{self.name}: the annotation files under {root} list no examples "
          f"for split(s) {empty}; TFDS cannot write an empty split. Check that "
          f"the manual dir holds the complete release:\n"
          f"{tfds.core.utils.dedent(self.MANUAL_DOWNLOAD_INSTRUCTIONS).strip()}")
    self.info.metadata["num_listed"] = {s: len(r) for s, r in splits.items()}
    self.info.metadata["num_classes"] = {
        s: len({r["label"] for r in rows}) for s, rows in splits.items()}
    self.info.metadata["bad_images"] = self.bad_images
    self.info.metadata["max_side"] = self.max_side
    return {s: self._generate_examples(rows) for s, rows in splits.items()}

  def _generate_examples(self, rows):
    for row in rows:
      try:
        data = read_checked_image(row["image"])
      except BadImageError:
        if not self.skip_bad_images:
          raise
        self.bad_images.append(row["image"])
        continue
      example = {k: v for k, v in row.items() if k != "key"}
      example["image"] = self._transform_image(data, row)
      if self.max_side:
        example["image"] = shrink_image(example["image"], self.max_side)
      yield row["key"], example


def box_feature() -> tfds.features.Tensor:
  """Pixel box (x1, y1, x2, y2) as in the official annotation files."""
  return tfds.features.Tensor(shape=(4,), dtype=np.int32)
