"""The Sketchy Database (Sangkloy et al. 2016) for sketch -> photo retrieval.

Uses the un-augmented renderings (`tx_000000000000`) and the official test
photo list `info/testset.txt` (1,250 photos, 10 per category): a test photo's
sketches are the test queries; all other photos and sketches train.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/rendered_256x256/256x256/photo/tx_000000000000/<category>/<photo>.jpg
<manual_dir>/rendered_256x256/256x256/sketch/tx_000000000000/<category>/<photo>-<n>.png
<manual_dir>/info/testset.txt    one "<category>/<photo>.jpg" a line
(the 256x256 folder may also sit directly in <manual_dir>, and info/ may be
 inside info-06-04/)
"""
_TX = "tx_000000000000"
SPLITS = ("train_photos", "train_sketches", "test_photos", "test_sketches")


def _list_dir(path: str, suffix: str) -> list[str]:
  return sorted(f for f in os.listdir(path)
                if f.lower().endswith(suffix) and not f.startswith("."))


class SketchyBuilder(base.ManualBuilder):
  """Sketchy: 125 categories, 12,500 photos, 75,471 sketches.

  Every example carries `photo_id`; `label` equals it (an instance hit is a
  sketch retrieving its own photo). Our numbering: train photos first, sorted
  by (category, photo name), 0..11249, then test photos, 11250..12499.
  `category` indexes the sorted category folder names. `sketch_index` is the
  `<n>` of `<photo>-<n>.png` (from 1) and 0 on photos.
  """

  name = datasets.CATALOGUE["sketchy"].tfds_name
  EXPECTED_COUNTS = datasets.CATALOGUE["sketchy"].splits
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  From https://sketchy.eye.gatech.edu/ (Sketchy Database) download
  rendered_256x256.7z (photos and sketches) and info-06-04.7z (test list),
  then unpack both in the manual dir:
  `7z x rendered_256x256.7z -o<manual_dir>; 7z x info-06-04.7z -o<manual_dir>`.
  Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "photo_id": np.int64,
        "photo_name": tfds.features.Text(),
        "category": np.int64,
        "category_name": tfds.features.Text(),
        "sketch_index": np.int64,
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    top = os.path.dirname(base.first_existing(
        [os.path.join(root, "rendered_256x256", "256x256", "photo"),
         os.path.join(root, "256x256", "photo")],
        layout=LAYOUT, what="photo folder"))
    photo_dir = base.require(os.path.join(top, "photo", _TX), layout=LAYOUT)
    sketch_dir = base.require(os.path.join(top, "sketch", _TX), layout=LAYOUT)
    testset = base.first_existing(
        [os.path.join(root, "info", "testset.txt"),
         os.path.join(root, "info-06-04", "info", "testset.txt")],
        layout=LAYOUT, what="test photo list testset.txt")
    categories = sorted(d for d in os.listdir(photo_dir)
                        if os.path.isdir(os.path.join(photo_dir, d)))
    photos = [(c, f) for c in categories
              for f in _list_dir(os.path.join(photo_dir, c), ".jpg")]
    with open(testset) as f:
      test = {line.strip() for line in f if line.strip()}
    known = {f"{c}/{f}" for c, f in photos}
    if test - known:
      raise ValueError(
          f"{testset} lists {len(test - known)} photos not found under "
          f"{photo_dir}, e.g. {sorted(test - known)[0]}")
    ordered = ([p for p in photos if f"{p[0]}/{p[1]}" not in test]
               + [p for p in photos if f"{p[0]}/{p[1]}" in test])
    photo_ids = {(c, os.path.splitext(f)[0]): i for i, (c, f) in enumerate(ordered)}
    cat_ids = {c: i for i, c in enumerate(categories)}
    splits = {s: [] for s in SPLITS}
    for c, f in ordered:
      rel = f"{c}/{f}"
      name = os.path.splitext(f)[0]
      split = "test_photos" if rel in test else "train_photos"
      splits[split].append(self._row(
          f"photo/{rel}", os.path.join(photo_dir, c, f), photo_ids[c, name],
          name, cat_ids[c], c, 0))
    for c in categories:
      if not os.path.isdir(os.path.join(sketch_dir, c)):
        continue  # a category without sketches shows up in the count check
      for f in _list_dir(os.path.join(sketch_dir, c), ".png"):
        name, _, n = os.path.splitext(f)[0].rpartition("-")
        if (c, name) not in photo_ids or not n.isdigit():
          raise ValueError(
              f"Sketch {os.path.join(sketch_dir, c, f)} does not name a photo "
              f"of {os.path.join(photo_dir, c)} as '<photo>-<n>.png'")
        split = ("test_sketches" if f"{c}/{name}.jpg" in test
                 else "train_sketches")
        splits[split].append(self._row(
            f"sketch/{c}/{f}", os.path.join(sketch_dir, c, f),
            photo_ids[c, name], name, cat_ids[c], c, int(n)))
    return splits

  @staticmethod
  def _row(key, path, photo_id, photo_name, category, category_name, n):
    return {"key": key, "image": path, "label": photo_id, "photo_id": photo_id,
            "photo_name": photo_name, "category": category,
            "category_name": category_name, "sketch_index": n,
            "file_name": key}
