"""CUB-200-2011 with the metric-learning split: classes 1-100 train, 101-200 test."""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/CUB_200_2011/images.txt             "<image_id> <class_dir>/<file>.jpg"
<manual_dir>/CUB_200_2011/image_class_labels.txt "<image_id> <class_id 1..200>"
<manual_dir>/CUB_200_2011/images/<class_dir>/<file>.jpg
(<manual_dir> may also be the CUB_200_2011 folder itself.)
"""


def _read_pairs(path: str) -> dict[int, str]:
  out = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split(maxsplit=1)
      if len(parts) != 2:
        raise ValueError(f"{path}:{n}: expected '<image_id> <value>', got {line!r}")
      out[int(parts[0])] = parts[1].strip()
  return out


class CubBuilder(base.ManualBuilder):
  """CUB-200-2011 birds; train = classes 1-100, test = classes 101-200.

  label = class_id - 1, so train labels are 0..99 and test labels 100..199.
  """

  name = datasets.CATALOGUE["cub"].tfds_name
  EXPECTED_COUNTS = datasets.CATALOGUE["cub"].splits
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/
  (CaltechDATA record 20098) and unpack it in the manual dir:
  `tar xzf CUB_200_2011.tgz -C <manual_dir>`. Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "image_id": np.int64,
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    top = base.find_top(root, folder="CUB_200_2011", marker="images.txt",
                        layout=LAYOUT)
    paths = _read_pairs(base.require(os.path.join(top, "images.txt"), layout=LAYOUT))
    classes = _read_pairs(base.require(
        os.path.join(top, "image_class_labels.txt"), layout=LAYOUT))
    base.require(os.path.join(top, "images"), layout=LAYOUT, what="image folder")
    splits = {"train": [], "test": []}
    for image_id in sorted(paths):
      if image_id not in classes:
        raise ValueError(f"image_id {image_id} of images.txt has no line in "
                         f"{os.path.join(top, 'image_class_labels.txt')}")
      class_id = int(classes[image_id])
      if not 1 <= class_id <= 200:
        raise ValueError(f"image_id {image_id}: class {class_id} not in 1..200")
      rel = paths[image_id]
      splits["train" if class_id <= 100 else "test"].append({
          "key": rel,
          "image": os.path.join(top, "images", rel),
          "label": class_id - 1,
          "image_id": image_id,
          "file_name": rel,
      })
    return splits
