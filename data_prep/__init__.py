"""TFDS builders for the six real data sets jaxdml trains and evaluates on.

None can be downloaded by a program: the user downloads the official release,
unpacks it in a manual dir, and runs

    python -m jaxdml.data_prep.build NAME --manual_dir=DIR --data_dir=DATA_DIR

which writes `array_record` files that grain reads with random access:

    tfds.data_source(TFDS_NAMES[NAME], split="train", data_dir=DATA_DIR)

`tfds.data_source` finds the prepared data from its files alone, so readers
(jaxdml) need not import this package. Importing it does register the six
builder classes with TFDS, as every TFDS builder class does when defined.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from .cars196 import Cars196Builder
from .cub import CubBuilder
from .deepfashion2 import DeepFashion2Builder
from .inshop import InShopBuilder
from .sketchy import SketchyBuilder
from .sop import SopBuilder

BUILDERS = {
    "sketchy": SketchyBuilder,
    "cub": CubBuilder,
    "cars196": Cars196Builder,
    "sop": SopBuilder,
    "inshop": InShopBuilder,
    "deepfashion2": DeepFashion2Builder,
}
TFDS_NAMES = {short: cls.name for short, cls in BUILDERS.items()}


def builder_class(name: str):
  """The builder class for a short name ("cub") or a TFDS name ("jaxdml_cub")."""
  for short, cls in BUILDERS.items():
    if name in (short, cls.name):
      return cls
  raise ValueError(f"Unknown data set {name!r}; choose one of {sorted(BUILDERS)} "
                   f"(TFDS names {sorted(TFDS_NAMES.values())}).")


def load_info(name: str, *, data_dir: str | os.PathLike,
              config: str | None = None) -> tfds.core.DatasetInfo:
  """DatasetInfo of a prepared data set: splits, counts, features, metadata.

  `info.metadata` holds `num_classes` per split, `num_listed` (examples the
  annotation files list) and `bad_images` (files skipped with
  --skip_bad_images). Raises FileNotFoundError with the build command when the
  data set has not been prepared under `data_dir`.
  """
  cls = builder_class(name)
  builder = cls(data_dir=os.fspath(data_dir), config=config)
  if not builder.is_prepared():
    short = next(s for s, c in BUILDERS.items() if c is cls)
    raise FileNotFoundError(
        f"{cls.name} is not prepared under {data_dir}. Build it with:\n"
        f"  python -m jaxdml.data_prep.build {short} --manual_dir=<your download> "
        f"--data_dir={data_dir}")
  return builder.info
