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
from jaxdml import losses, memory as memory_lib, teacher as teacher_lib


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


def dummy_inputs(config, size: int | None = None) -> tuple:
  """One fake image per model input, for `model.init`."""
  size = int(size or config.data.image_size)
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


def _teacher_kwargs(config, name: str, teacher_embeddings, step) -> dict:
  """What a distillation loss takes beyond the ranking-loss contract."""
  if name not in losses.NEEDS_TEACHER:
    return {}
  if teacher_embeddings is None:
    raise ValueError(f"loss {name!r} distils a teacher, but the config has none: set "
                     "config.teacher (see jaxdml.teacher).")
  kwargs = {"teacher_embeddings": teacher_embeddings}
  if name == "obd_sd":
    kwargs["progress"] = teacher_lib.progress(config, step)
  return kwargs


def _flat(task: str, outputs):
  """Every embedding of the batch as one [N, D] array (both towers for SBIR)."""
  if task == "sbir":
    return jnp.concatenate([outputs["query"], outputs["gallery"]])
  return outputs


def compute_loss(config, outputs, batch: dict, memory: dict, step, teacher_outputs=None):
  """Returns `(loss, aux, new_memory)` for the model outputs of one batch.

  `teacher_outputs`: the teacher's outputs on the same batch (no gradient),
  or None. They feed a distillation loss (as the recipe's loss, RAML, or as
  `config.teacher.loss`, SBIR KD and OBD-SD) and, with
  `config.teacher.feeds_memory`, the cross-batch memory.
  """
  name, hparams = loss_hparams(config.loss)
  hparams.update(_teacher_kwargs(config, name, teacher_outputs, step))
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
      feeds = teacher_outputs is not None and config.teacher.get("feeds_memory", False)
      loss, aux, memory = _memory_loss(config, loss_fn, hparams, embeddings, labels,
                                       memory, step,
                                       batch_keys=teacher_outputs if feeds else embeddings)
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
  distill = config.teacher.get("loss") if teacher_lib.uses_teacher(config) else None
  if distill:
    d_name, d_hparams = loss_hparams(distill)
    d_hparams.update(_teacher_kwargs(config, d_name, _flat(config.task, teacher_outputs), step))
    value, d_aux = losses.get(d_name)(embeddings=_flat(config.task, outputs), **d_hparams)
    aux[f"distill/{d_name}"] = value
    aux.update({f"distill/{k}": v for k, v in d_aux.items()})
    loss = loss + float(distill.get("weight", 1.0)) * value
  return loss, aux, memory


MEMORY_TERMS = ("joint", "xbm")


def _memory_loss(config, loss_fn, hparams, embeddings, labels, memory, step, batch_keys):
  """The ranking loss with the cross-batch memory; returns (loss, aux, memory).

  `config.memory.terms` says how the memory's pairs enter the loss:
  - "joint": one loss over batch-vs-(batch + adapted memory) pairs, the batch
    enqueued after it (PML's `CrossBatchMemory` shape: one reduction over all
    pairs).
  - "xbm": XBM's code (`engine/trainer.py`): the batch term (batch vs batch)
    plus `memory.weight` times the memory term (batch vs the adapted memory
    with the batch already enqueued, its own copy dropped). In-batch pairs
    thus count twice, once through the memory's detached copies. As in XBM,
    nothing is enqueued before `memory.start_step`.
  `batch_keys` are the batch's entries in the reference set and what is
  enqueued: the embeddings themselves, or a momentum encoder's. Before
  `memory.start_step` the memory slots are masked out rather than skipped,
  so the step compiles once and its shapes never change.
  """
  cfg = config.memory
  terms = cfg.get("terms", "joint")
  if terms not in MEMORY_TERMS:
    raise ValueError(f"config.memory.terms={terms!r}: expected one of {MEMORY_TERMS} "
                     "(see jaxdml.tasks._memory_loss).")
  adapt_hparams = dict(cfg.get("adapt_hparams", None) or {})
  method = cfg.get("adapt", "none")
  diagnostics = {}
  if method == "kalman":  # Logged: does the filter's noise model fit training?
    nis = memory_lib.kalman_innovations(memory, batch_keys, **adapt_hparams)
    diagnostics = {f"memory/kalman_nis_{k}": v for k, v in nis.items()}
  adapted, adapted_memory = memory_lib.adapt(memory, batch_keys, method=method, **adapt_hparams)
  batch_size = embeddings.shape[0]
  active = step >= int(cfg.get("start_step", 0))
  keys = jax.lax.stop_gradient(batch_keys)
  if terms == "xbm":
    loss, aux = loss_fn(embeddings=embeddings, labels=labels, **hparams)
    ref = memory_lib.enqueued_reference_set(adapted_memory, adapted, keys, labels)
    ref["ref_valid"] = ref["ref_valid"] & active
    memory_loss, memory_aux = loss_fn(embeddings=embeddings, labels=labels, **ref, **hparams)
    aux = {**aux, "batch_term": loss, "memory_term": memory_loss,
           **{f"memory/{k}": v for k, v in memory_aux.items()}}
    enqueued = memory_lib.enqueue(adapted_memory, keys, labels)
    memory = jax.tree.map(lambda new, old: jnp.where(active, new, old), enqueued, adapted_memory)
    return loss + float(cfg.get("weight", 1.0)) * memory_loss, {**aux, **diagnostics}, memory
  ref = memory_lib.reference_set(adapted_memory, adapted, batch_keys, labels)
  ref_valid = ref["ref_valid"].at[batch_size:].set(ref["ref_valid"][batch_size:] & active)
  loss, aux = loss_fn(embeddings=embeddings, labels=labels,
                      ref_embeddings=ref["ref_embeddings"], ref_labels=ref["ref_labels"],
                      ref_valid=ref_valid, ref_self_index=ref["ref_self_index"],
                      **hparams)
  # Enqueued after the loss, so the batch meets itself once (in the batch
  # part, own copy excluded).
  memory = memory_lib.enqueue(adapted_memory, keys, labels)
  return loss, {**aux, **diagnostics}, memory
