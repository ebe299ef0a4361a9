r"""Builds one data set from the user's own download into TFDS array_record files.

  python -m jaxdml.data_prep.build cub --manual_dir=~/downloads/cub \
      --data_dir=~/tensorflow_datasets [--skip_bad_images]

NAME is one of sketchy, cub, cars196, sop, inshop, deepfashion2 (or its TFDS
name, e.g. jaxdml_cub). At the end the split sizes are compared with the
published numbers; a mismatch prints a warning (not an error) so partial or
test copies still build. `--expect_counts=train=10,test=12` checks other
numbers, `--expect_counts=none` checks nothing.

`--data_dir` may be a bucket (gs://BUCKET/tensorflow_datasets): the set is
built in a local temporary folder and uploaded (it needs that much local disk).
"""
from __future__ import annotations

import os
import sys
import tempfile

import tensorflow_datasets as tfds
from absl import app, flags

from . import base
from . import builder_class, BUILDERS
from jaxdml import paths  # a URL --data_dir (and STORAGE_EMULATOR_HOST) as jaxdml reads it

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the unpacked official release.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir to write to (read it with tfds.data_source).")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad_images", False,
    "Leave out images that cannot be read or decoded (they are counted and "
    "listed); without it the first such image stops the build.")
_EXPECT = flags.DEFINE_string(
    "expect_counts", "published",
    "'published' (default), 'none', or 'split=N,...' ('a+b=N' for a sum).")
_CONFIG = flags.DEFINE_string(
    "config", None, "Builder config, e.g. 'crop' for deepfashion2.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rebuild even if the data set is already prepared.")
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", None,
    "Store a copy with the longer side at most this many px (e.g. 512 for "
    "originals far larger than the training crops): less to decode per step.")


def parse_expected(spec: str, published: dict[str, int]) -> dict[str, int]:
  """'published' -> the builder's numbers, 'none' -> {}, 'a=1,b+c=2' -> dict."""
  if spec == "published":
    return dict(published)
  if spec in ("none", ""):
    return {}
  out = {}
  for part in spec.split(","):
    key, sep, value = part.partition("=")
    if not sep or not value.strip().isdigit():
      raise ValueError(f"--expect_counts: cannot parse {part!r}; write "
                       "'published', 'none' or 'split=N,other=M'")
    out[key.strip()] = int(value)
  return out


def build(name: str, *, manual_dir: str, data_dir: str,
          skip_bad_images: bool = False, expect_counts: str = "published",
          config: str | None = None, overwrite: bool = False,
          max_side: int | None = None) -> dict:
  """Prepares data set `name`; returns a report and prints a summary.

  Returns {"tfds_name", "data_dir", "counts": {split: n}, "warnings": [...],
  "bad_images": [paths skipped]}. Raises MissingFileError naming the missing
  file and the expected layout, or BadImageError naming the unreadable image
  (unless `skip_bad_images`).
  """
  cls = builder_class(name)
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  data_dir = os.path.expanduser(os.fspath(data_dir))
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise base.MissingFileError(
        f"--manual_dir {manual_dir} does not exist or is empty.\n"
        f"{tfds.core.utils.dedent(cls.MANUAL_DOWNLOAD_INSTRUCTIONS).strip()}")
  expected = parse_expected(expect_counts, cls.EXPECTED_COUNTS)
  if max_side is not None and max_side < 1:
    raise ValueError(f"--max_side={max_side}: expected a positive number of pixels.")
  def make_builder(where):
    return cls(data_dir=where, config=config, file_format="array_record",
               skip_bad_images=skip_bad_images, max_side=max_side)

  paths.check_reachable(data_dir, "--data_dir")  # a local path passes as it is
  builder = make_builder(data_dir)
  was_prepared = builder.is_prepared() and not overwrite
  if was_prepared:
    stored = (builder.info.metadata or {}).get("max_side")
    if stored != max_side:
      raise ValueError(
          f"{builder.data_dir} was prepared with max_side={stored}, not {max_side}: "
          "rerun with --overwrite to rebuild it, or use another --data_dir.")
  tfds.display_progress_bar(True)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if was_prepared or not paths.is_url(data_dir):
    _prepare(builder, manual_dir, mode)
  else:
    # array_record's writer opens local files only: build in a local staging
    # folder, then upload with dataset_info.json last, so that a reader that
    # finds the data set prepared finds all of it.
    with tempfile.TemporaryDirectory() as staging:
      local = make_builder(staging)
      _prepare(local, manual_dir, mode)
      print(f"Uploading {local.data_dir} to {builder.data_dir} ...")
      paths.upload_tree(local.data_dir, builder.data_dir, replace=True, last="dataset_info.json")
    builder = make_builder(data_dir)
  info = builder.info
  counts = {s: info.splits[s].num_examples for s in info.splits}
  bad = list(info.metadata.get("bad_images", [])) if info.metadata else []
  warnings = base.check_counts(
      counts, expected, source="published" if expect_counts == "published"
      else "expected (--expect_counts)")
  print(f"\n{cls.name} ({'already prepared, reused' if was_prepared else 'built'})"
        f" in {builder.data_dir}")
  for split, n in counts.items():
    print(f"  {split:>16}: {n:,} examples")
  if bad:
    print(f"Skipped {len(bad)} unreadable image(s):")
    print("\n".join(f"  {p}" for p in bad[:20]) + ("\n  ..." if len(bad) > 20 else ""))
  for w in warnings:
    print(w)
  if expected and not warnings:
    print("Split sizes match the expected numbers.")
  return {"tfds_name": cls.name, "data_dir": builder.data_dir, "counts": counts,
          "warnings": warnings, "bad_images": bad}


def _prepare(builder, manual_dir, mode):
  # Nothing is downloaded; the scratch dir keeps TFDS's empty download and
  # extract folders out of data_dir. No GCS look-up: these sets are not there.
  with tempfile.TemporaryDirectory() as scratch:
    builder.download_and_prepare(
        download_dir=scratch,
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, download_mode=mode, try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"Give one data set name: {sorted(BUILDERS)}")
  if not _MANUAL_DIR.value or not _DATA_DIR.value:
    raise app.UsageError("--manual_dir and --data_dir are required.")
  try:
    build(argv[1], manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
          skip_bad_images=_SKIP_BAD.value, expect_counts=_EXPECT.value,
          config=_CONFIG.value, overwrite=_OVERWRITE.value, max_side=_MAX_SIDE.value)
  except (base.MissingFileError, base.BadImageError, ValueError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """The `jaxdml-prepare-data` command."""
  app.run(main)


if __name__ == "__main__":
  run()
