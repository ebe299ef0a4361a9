"""Stanford Cars (Cars196) with the metric-learning split: classes 1-98 train,
99-196 test. The official train/test flag of cars_annos.mat is ignored for the
split (kept as the `official_test` feature)."""
from __future__ import annotations

import os

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/cars_annos.mat     struct array `annotations` with fields
                                relative_im_path, bbox_x1, bbox_y1, bbox_x2,
                                bbox_y2, class (1..196), test (0/1)
<manual_dir>/car_ims/000001.jpg ... (paths as in relative_im_path)
"""
_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
           "class", "test")


class Cars196Builder(base.ManualBuilder):
  """Cars196; train = classes 1-98, test = classes 99-196.

  label = class - 1 (train 0..97, test 98..195). `bbox` is the official pixel
  box (x1, y1, x2, y2); the standard protocol uses whole images.
  """

  name = datasets.CATALOGUE["cars196"].tfds_name
  EXPECTED_COUNTS = datasets.CATALOGUE["cars196"].splits
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download car_ims.tgz (all 16,185 images) and cars_annos.mat from the
  Stanford Cars page (https://ai.stanford.edu/~jkrause/cars/car_dataset.html;
  the original links are often down: use a mirror of the same two files),
  then `tar xzf car_ims.tgz -C <manual_dir>` and copy cars_annos.mat there.
  Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "bbox": base.box_feature(),
        "official_test": np.bool_,
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    path = base.require(os.path.join(root, "cars_annos.mat"), layout=LAYOUT)
    base.require(os.path.join(root, "car_ims"), layout=LAYOUT, what="image folder")
    annos = np.atleast_1d(scipy.io.loadmat(path, squeeze_me=True)["annotations"])
    missing = [f for f in _FIELDS if f not in (annos.dtype.names or ())]
    if missing:
      raise ValueError(f"{path}: `annotations` lacks fields {missing}; "
                       f"expected {list(_FIELDS)}")
    splits = {"train": [], "test": []}
    for a in annos:
      rel = str(a["relative_im_path"])
      class_id = int(a["class"])
      if not 1 <= class_id <= 196:
        raise ValueError(f"{path}: {rel} has class {class_id}, not in 1..196")
      splits["train" if class_id <= 98 else "test"].append({
          "key": rel,
          "image": os.path.join(root, rel),
          "label": class_id - 1,
          "bbox": np.array([int(a[f"bbox_{c}"]) for c in ("x1", "y1", "x2", "y2")],
                           np.int32),
          "official_test": bool(a["test"]),
          "file_name": rel,
      })
    return splits
