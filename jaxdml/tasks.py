"""What a batch means for each task: model inputs, towers, views.

Two tasks cover the five recipes:
- `sbir`: two towers; sketches are anchors, photos the reference set, the
  label of a pair is the photo's instance id (`batch["label"]`).
- `single`: one encoder; in-batch pairs, optionally against the cross-batch
  memory (XBM/XBN, IRT).
The functions here run inside the jitted step: no Python control flow on
values, only on the task.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdml import data as data_lib
from jaxdml.data import device_augment


def model_inputs(task: str, batch: dict, images: str = "same") -> tuple:
  """Normalised float images in the order the model's __call__ takes them.

  Batches of coupled views (RAML) carry `image_lo` for the student and
  `image_hi` for a teacher that asks for them (`images="image_hi"`).
  """
  if task == "sbir":
    return (data_lib.normalize(batch["sketch"]), data_lib.normalize(batch["photo"]))
  if images == "image_hi":
    return (data_lib.normalize(batch["image_hi"]),)
  return (data_lib.normalize(batch["image_lo"] if "image_lo" in batch else batch["image"]),)


def dummy_inputs(task: str, size: int) -> tuple:
  """One fake image per model input, for `model.init`."""
  image = jnp.zeros((1, int(size), int(size), 3), jnp.uint8)
  return model_inputs(task, {"sketch": image, "photo": image, "image": image})


def device_views(batch: dict, lo: int | None) -> dict:
  """The batch with RAML's coupled views made on the device (`image_hi`,
  `image_lo` at `lo` px) where the host shipped crops and parameters for
  that (`data.views.on_device`, the default); any other batch as it is."""
  if device_augment.CROPS not in batch:
    return batch
  image_hi, image_lo = device_augment.coupled_views(batch, int(lo))
  rest = {k: v for k, v in batch.items() if k not in device_augment.KEYS}
  return {**rest, "image_hi": image_hi, "image_lo": image_lo}


def towers(task: str) -> dict:
  """Tower name -> the model method that embeds one image set with it.

  The one place that knows SBIR's two towers: evaluation, export and the
  benchmark embed through these. `None` is the model's `__call__`.
  """
  if task == "sbir":
    return {"query": "embed_query", "gallery": "embed_gallery"}
  return {"query": None, "gallery": None}


def flat(task: str, tree):
  """Every row of the batch as one array (both towers' rows for SBIR)."""
  if task == "sbir":
    return jnp.concatenate([tree["query"], tree["gallery"]])
  return tree
