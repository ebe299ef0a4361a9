"""What a batch means for each task: model inputs, loss terms, memory use.

Two tasks cover the five recipes:
- `sbir`: two towers; sketches are anchors, photos the reference set, the
  label of a pair is the photo's instance id (`batch["label"]`).
- `single`: one encoder; in-batch pairs, optionally against the cross-batch
  memory (XBM/XBN, IRT), and a teacher (RAML, OBD-SD) from the train state.
The functions here run inside the jitted step: no Python control flow on
values, only on config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml import data as data_lib
from jaxdml import losses, memory as memory_lib


def loss_hparams(cfg) -> tuple[str, dict]:
  """Splits a `{name, **hparams}` config into the name and the keywords."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = d.pop("name")
  d.pop("weight", None)
  return name, d


def model_variables(state: dict) -> dict:
  """The Flax variables of the train state's model (no empty batch_stats)."""
  variables = {"params": state["params"]}
  if jax.tree.leaves(state["batch_stats"]):
    variables["batch_stats"] = state["batch_stats"]
  return variables


def model_inputs(task: str, batch: dict) -> tuple:
  """Normalised float images in the order the model's __call__ takes them."""
  if task == "sbir":
    return (data_lib.normalize(batch["sketch"]), data_lib.normalize(batch["photo"]))
  return (data_lib.normalize(batch["image"]),)


def dummy_inputs(config) -> tuple:
  """One fake image per model input, for `model.init`."""
  size = int(config.data.image_size)
  image = jnp.zeros((1, size, size, 3), jnp.uint8)
  if config.task == "sbir":
    return model_inputs("sbir", {"sketch": image, "photo": image})
  return model_inputs("single", {"image": image})


def embedding_dim(model, config) -> int:
  """Embedding width, read off the model's output shape (no compute)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
  out, _ = jax.eval_shape(lambda v: model.apply(v, *dummy_inputs(config)), variables)
  out = out["gallery"] if isinstance(out, dict) else out
  return int(out.shape[-1])


def uses_memory(config) -> bool:
  return "memory" in config and int(config.memory.get("size", 0)) > 0


def init_memory(config, dim: int) -> dict:
  if not uses_memory(config):
    return {}
  return memory_lib.init(int(config.memory.size), dim)


def compute_loss(config, outputs, batch: dict, memory: dict, step):
  """Returns `(loss, aux, new_memory)` for the model outputs of one batch."""
  name, hparams = loss_hparams(config.loss)
  loss_fn = losses.get(name)
  labels = batch["label"]
  aux = {}
  if config.task == "sbir":
    loss, aux = loss_fn(embeddings=outputs["query"], labels=labels,
                        ref_embeddings=outputs["gallery"], ref_labels=labels,
                        **hparams)
    embeddings = outputs["query"]
  else:
    embeddings = outputs
    if uses_memory(config):
      loss, aux, memory = _memory_loss(config, loss_fn, hparams, embeddings,
                                       labels, memory, step)
    else:
      loss, aux = loss_fn(embeddings=embeddings, labels=labels, **hparams)
  aux = {f"loss/{k}": v for k, v in aux.items()}
  if uses_memory(config) and config.task != "sbir":
    aux["memory_fill"] = jnp.mean(memory["valid"].astype(jnp.float32))
  for reg in config.get("regularizers", None) or ():
    reg_name, reg_hparams = loss_hparams(reg)
    value, _ = losses.get(reg_name)(embeddings=embeddings, labels=labels, **reg_hparams)
    aux[f"reg/{reg_name}"] = value
    loss = loss + float(reg.get("weight", 1.0)) * value
  return loss, aux, memory


def _memory_loss(config, loss_fn, hparams, embeddings, labels, memory, step):
  """Batch vs (batch + adapted memory) pairs, then enqueue the new batch.

  Before `memory.start_step` the memory slots are masked out rather than
  skipped, so the step compiles once and its shapes never change.
  """
  cfg = config.memory
  adapt_hparams = dict(cfg.get("adapt_hparams", None) or {})
  adapted, memory = memory_lib.adapt(memory, embeddings, method=cfg.get("adapt", "none"),
                                     **adapt_hparams)
  ref = memory_lib.reference_set(memory, adapted, embeddings, labels)
  batch_size = embeddings.shape[0]
  active = step >= int(cfg.get("start_step", 0))
  ref_valid = ref["ref_valid"].at[batch_size:].set(ref["ref_valid"][batch_size:] & active)
  loss, aux = loss_fn(embeddings=embeddings, labels=labels,
                      ref_embeddings=ref["ref_embeddings"], ref_labels=ref["ref_labels"],
                      ref_valid=ref_valid, ref_self_index=ref["ref_self_index"],
                      **hparams)
  # Enqueued after the loss, so the batch meets itself once (in the batch
  # part, own copy excluded). XBM's code enqueues first and adds a separate
  # in-batch term, which counts in-batch pairs twice; the pairs are the same.
  memory = memory_lib.enqueue(memory, jax.lax.stop_gradient(embeddings), labels)
  return loss, aux, memory
