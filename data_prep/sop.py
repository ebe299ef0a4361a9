"""Stanford Online Products (SOP) with its official train/test lists."""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/Stanford_Online_Products/Ebay_train.txt  header
    "image_id class_id super_class_id path", then one image a line
<manual_dir>/Stanford_Online_Products/Ebay_test.txt   same columns
<manual_dir>/Stanford_Online_Products/<super_class>_final/<file>.JPG
(<manual_dir> may also be the Stanford_Online_Products folder itself.)
"""


def read_list(path: str) -> list[tuple[int, int, int, str]]:
  """Parses an Ebay_*.txt list: (image_id, class_id, super_class_id, path)."""
  rows = []
  with open(path) as f:
    header = f.readline().split()
    if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
      raise ValueError(f"{path}: header {header} is not "
                       "'image_id class_id super_class_id path'")
    for n, line in enumerate(f, 2):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 4:
        raise ValueError(f"{path}:{n}: expected 4 columns, got {line!r}")
      rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
  return rows


class SopBuilder(base.ManualBuilder):
  """Stanford Online Products; train 11,318 classes, test 11,316 classes.

  label = class_id - 1 (train 0..11317, test 11318..22633); super_class =
  super_class_id - 1 (12 product types).
  """

  name = datasets.CATALOGUE["sop"].tfds_name
  EXPECTED_COUNTS = datasets.CATALOGUE["sop"].splits
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download Stanford_Online_Products.zip from
  https://cvgl.stanford.edu/projects/lifted_struct/ and unpack it:
  `unzip Stanford_Online_Products.zip -d <manual_dir>`. Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "super_class": np.int64,
        "image_id": np.int64,
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    top = base.find_top(root, folder="Stanford_Online_Products",
                        marker="Ebay_train.txt", layout=LAYOUT)
    splits = {}
    for split in ("train", "test"):
      listing = base.require(os.path.join(top, f"Ebay_{split}.txt"), layout=LAYOUT)
      splits[split] = [{
          "key": rel,
          "image": os.path.join(top, rel),
          "label": class_id - 1,
          "super_class": super_id - 1,
          "image_id": image_id,
          "file_name": rel,
      } for image_id, class_id, super_id, rel in read_list(listing)]
    return splits
