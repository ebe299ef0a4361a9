"""DeepFashion In-shop Clothes Retrieval Benchmark: train / query / gallery."""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/Eval/list_eval_partition.txt   (or <manual_dir>/list_eval_partition.txt)
    line 1: number of images; line 2: "image_name item_id evaluation_status";
    then "img/<GENDER>/<category>/<item_id>/<file>.jpg <item_id> train|query|gallery"
<manual_dir>/img/...                         (or <manual_dir>/Img/img/...), from img.zip
"""
_ROLES = ("train", "query", "gallery")


def read_partition(path: str) -> list[tuple[str, str, str]]:
  """Parses list_eval_partition.txt into (image_name, item_id, status) rows."""
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  if len(lines) < 2 or lines[1].split() != ["image_name", "item_id",
                                            "evaluation_status"]:
    raise ValueError(f"{path}: expected a count line, then the header "
                     "'image_name item_id evaluation_status'")
  rows = [tuple(line.split()) for line in lines[2:]]
  for n, row in enumerate(rows, 3):
    if len(row) != 3 or row[2] not in _ROLES:
      raise ValueError(f"{path}:{n}: expected '<image_name> <item_id> "
                       f"train|query|gallery', got {lines[n - 1]!r}")
  if int(lines[0]) != len(rows):
    raise ValueError(f"{path}: line 1 announces {int(lines[0])} images but "
                     f"{len(rows)} are listed; the file is truncated or edited")
  return rows


class InShopBuilder(base.ManualBuilder):
  """In-Shop Clothes Retrieval; queries are matched against the gallery.

  label = integer id of the item_id string: train items are numbered first
  (sorted), 0..3996, then the test items (query and gallery share them),
  3997..7981. `evaluation_status` is the image's role (train/query/gallery).
  """

  name = datasets.CATALOGUE["inshop"].tfds_name
  EXPECTED_COUNTS = datasets.CATALOGUE["inshop"].splits
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  From the DeepFashion page (https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html),
  "In-shop Clothes Retrieval Benchmark" folder, download Img/img.zip and
  Eval/list_eval_partition.txt. Unpack img.zip in the manual dir
  (`unzip img.zip -d <manual_dir>`) and put list_eval_partition.txt there (or
  keep the Eval/ folder). Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "item_id": tfds.features.Text(),
        "evaluation_status": tfds.features.Text(),
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    partition = base.first_existing(
        [os.path.join(root, "Eval", "list_eval_partition.txt"),
         os.path.join(root, "list_eval_partition.txt")],
        layout=LAYOUT, what="list_eval_partition.txt")
    img_root = os.path.dirname(base.first_existing(
        [os.path.join(root, "img"), os.path.join(root, "Img", "img")],
        layout=LAYOUT, what="image folder img/"))
    rows = read_partition(partition)
    train_items = sorted({item for _, item, role in rows if role == "train"})
    test_items = sorted({item for _, item, role in rows if role != "train"}
                        - set(train_items))
    labels = {item: i for i, item in enumerate(train_items + test_items)}
    splits = {role: [] for role in _ROLES}
    for name, item, role in rows:
      splits[role].append({
          "key": name,
          "image": os.path.join(img_root, name),
          "label": labels[item],
          "item_id": item,
          "evaluation_status": role,
          "file_name": name,
      })
    return splits
