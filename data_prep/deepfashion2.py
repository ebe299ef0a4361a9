"""DeepFashion2 consumer-to-shop clothes retrieval.

One example per clothing item. Two items match when their images share
`pair_id` and the items share a `style` > 0 (the data set's own definition).
Splits: `train` = train-set items with style > 0 (user and shop);
`query` = validation items from user images with style > 0; `gallery` =
validation items from shop images, all of them: style-0 items get labels of
their own and act as distractors (DeepFashion2's published gallery, 37,183
items, is the shop items of every style). Drop them with `style > 0`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from . import base
from jaxdml.config import datasets

LAYOUT = """
<manual_dir>/train/image/000001.jpg ...       <manual_dir>/train/annos/000001.json ...
<manual_dir>/validation/image/000001.jpg ...  <manual_dir>/validation/annos/000001.json ...
each json: {"source": "user"|"shop", "pair_id": int,
            "item1": {"style": int, "bounding_box": [x1, y1, x2, y2],
                      "category_id": int, ...}, "item2": {...}, ...}
"""


@dataclasses.dataclass
class DeepFashion2Config(tfds.core.BuilderConfig):
  """`crop`: store each item cropped to its box instead of the whole image."""
  crop: bool = False


def read_items(annos_dir: str, image_dir: str) -> list[dict]:
  """One dict per item of every annotation file, in file order."""
  items = []
  names = sorted(f for f in os.listdir(annos_dir) if f.endswith(".json"))
  for fname in tqdm.tqdm(names, desc=f"Reading {annos_dir}", unit=" files"):
    path = os.path.join(annos_dir, fname)
    with open(path) as f:
      anno = json.load(f)
    if "source" not in anno or "pair_id" not in anno:
      raise ValueError(f"{path}: lacks 'source' or 'pair_id'")
    stem = os.path.splitext(fname)[0]
    keys = sorted((k for k in anno if k.startswith("item") and k[4:].isdigit()),
                  key=lambda k: int(k[4:]))
    for k in keys:
      item = anno[k]
      items.append({
          "stem": stem, "item": int(k[4:]), "source": anno["source"],
          "pair_id": int(anno["pair_id"]), "style": int(item["style"]),
          "category_id": int(item.get("category_id", 0)),
          "bbox": np.asarray(item["bounding_box"], np.int32),
          "image": os.path.join(image_dir, stem + ".jpg"),
      })
  return items


class DeepFashion2Builder(base.ManualBuilder):
  """DeepFashion2 retrieval: user-item queries, shop-item gallery.

  label = integer id of (pair_id, style): train pairs numbered first, sorted,
  then validation pairs, then one fresh label per style-0 gallery item.
  `bbox` is the item's pixel box (x1, y1, x2, y2) in the original image; with
  the default config the image is whole, with config `crop` it is the box.
  """

  name = datasets.CATALOGUE["deepfashion2"].tfds_name
  BUILDER_CONFIGS = [
      DeepFashion2Config(name="full", description="whole images plus bbox"),
      DeepFashion2Config(name="crop", description="images cropped to the item",
                         crop=True),
  ]
  DEFAULT_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  DeepFashion2 (https://github.com/switchablenorms/DeepFashion2): fill in the
  form linked there to get the zip password, download train.zip and
  validation.zip, and unzip both in the manual dir. Expected layout:
  {LAYOUT}"""

  def _features(self):
    return {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": np.int64,
        "pair_id": np.int64,
        "style": np.int64,
        "source": tfds.features.Text(),
        "category_id": np.int64,
        "bbox": base.box_feature(),
        "file_name": tfds.features.Text(),
    }

  def _read_rows(self, root):
    parts = {}
    for part in ("train", "validation"):
      annos = base.require(os.path.join(root, part, "annos"), layout=LAYOUT)
      images = base.require(os.path.join(root, part, "image"), layout=LAYOUT)
      parts[part] = read_items(annos, images)
    train = [i for i in parts["train"] if i["style"] > 0]
    val = parts["validation"]
    query = [i for i in val if i["source"] == "user" and i["style"] > 0]
    gallery = [i for i in val if i["source"] == "shop"]
    ids = base.label_map((i["pair_id"], i["style"]) for i in train)
    val_ids = base.label_map((i["pair_id"], i["style"]) for i in query + gallery
                             if i["style"] > 0)
    labels = {("train",) + k: v for k, v in ids.items()}
    labels.update({("validation",) + k: len(ids) + v for k, v in val_ids.items()})
    fresh = len(labels)
    splits = {}
    for split, part, items in (("train", "train", train), ("query", "validation", query),
                               ("gallery", "validation", gallery)):
      rows = []
      for i in items:
        if i["style"] > 0:
          label = labels[part, i["pair_id"], i["style"]]
        else:
          label, fresh = fresh, fresh + 1
        key = f"{part}/{i['stem']}/item{i['item']}"
        rows.append({
            "key": key, "image": i["image"], "label": label,
            "pair_id": i["pair_id"], "style": i["style"], "source": i["source"],
            "category_id": i["category_id"], "bbox": i["bbox"], "file_name": key,
        })
      splits[split] = rows
    return splits

  def _transform_image(self, data, row):
    return base.crop_image(data, row["bbox"]) if self.builder_config.crop else data
