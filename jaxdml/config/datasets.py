"""The catalogue of data sets jaxdml trains and evaluates on, written once.

Recipes read it (memory and epoch sizes, evaluation ks and search backend),
the pipeline reads it (how a set's splits are used), `data_prep` reads it
(TFDS names, the published split sizes its builds are checked against).
Adding a data set is one entry here plus its `data_prep` builder.
"""

from __future__ import annotations

import dataclasses

SYNTHETIC = "synthetic_sketchy"

# How a data set's splits serve training and evaluation.
KINDS = {
    "sbir": ("train_photos", "train_sketches", "test_photos", "test_sketches"),
    "same": ("train", "test"),  # the test split is both query and gallery
    "query_gallery": ("train", "query", "gallery"),
}


@dataclasses.dataclass(frozen=True)
class DataSet:
  """One data set: `name` is its short name (`--config=cub_...`)."""
  name: str
  kind: str
  # Published split sizes (a "+"-joined key: the sum of those splits);
  # empty where the release defines none.
  splits: dict
  eval_ks: tuple = (1, 2, 4, 8)
  # Evaluation's search: "scann" for galleries where exact search is slow.
  backend: str = "exact"

  @property
  def tfds_name(self) -> str:
    return f"jaxdml_{self.name}"

  @property
  def train_images(self) -> int | None:
    """The size of the training split (memory sizes "the data set" read it)."""
    return self.splits.get("train")


CATALOGUE = {d.name: d for d in (
    DataSet("sketchy", "sbir", {"train_photos": 11250, "test_photos": 1250,
                                "train_sketches+test_sketches": 75471}, eval_ks=(1, 5, 10)),
    DataSet("cub", "same", {"train": 5864, "test": 5924}),
    DataSet("cars196", "same", {"train": 8054, "test": 8131}),
    DataSet("sop", "same", {"train": 59551, "test": 60502}, eval_ks=(1, 10, 100),
            backend="scann"),
    DataSet("inshop", "query_gallery", {"train": 25882, "query": 14218, "gallery": 12612},
            eval_ks=(1, 10, 100)),
    DataSet("deepfashion2", "query_gallery", {}, backend="scann"),
)}


def get(name: str) -> DataSet:
  """The entry of a short name ("cub") or a TFDS name ("jaxdml_cub", with
  an optional "/config" or ":version" suffix)."""
  short = name.partition("/")[0].partition(":")[0].removeprefix("jaxdml_")
  if short not in CATALOGUE:
    raise ValueError(f"unknown data set {name!r}; jaxdml knows {sorted(CATALOGUE)} "
                     f"(the jaxdml_ prefix is optional) and {SYNTHETIC!r}.")
  return CATALOGUE[short]


def kind(name: str) -> str:
  """"sbir", "same" or "query_gallery": how the set's splits are used."""
  return "sbir" if name == SYNTHETIC else get(name).kind
