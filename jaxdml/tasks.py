"""What a batch means for each task: model inputs, loss terms, memory use.

Two tasks cover the five recipes:
- `sbir`: two towers; sketches are anchors, photos the reference set, the
  label of a pair is the photo's instance id (`batch["label"]`).
- `single`: one encoder; in-batch pairs, optionally against the cross-batch
  memory (XBM/XBN, IRT).
Either may add weighted terms (`config.terms`: distillation, regularisers)
fed generically with what each loss consumes. No loss or teacher is named
here: `jaxdml.losses` and `jaxdml.teacher` say what they take.
The functions here run inside the jitted step: no Python control flow on
values, only on config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml import data as data_lib
from jaxdml.data import device_augment
from jaxdml import losses, memory as memory_lib
from jaxdml.losses import miners


def loss_hparams(cfg) -> tuple[str, dict]:
  """Splits a `{name, **hparams}` config into the name and the keywords."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  name = d.pop("name")
  d.pop("weight", None)
  return name, d


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


def device_views(config, batch: dict) -> dict:
  """The batch with RAML's coupled views made on the device (`image_hi`,
  `image_lo`) where the host shipped crops and parameters for that
  (`data.views.on_device`, the default); any other batch as it is."""
  if device_augment.CROPS not in batch:
    return batch
  image_hi, image_lo = device_augment.coupled_views(batch, int(config.data.views["lo"]))
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


# Every `config.memory` field and its default (`config_lib.resolve` fills them in).
MEMORY_DEFAULTS = {"size": 0, "start_step": 0, "adapt": "none", "adapt_hparams": {},
                   "terms": "joint", "weight": 1.0}


def memory_settings(config) -> dict:
  """`config.memory` over MEMORY_DEFAULTS."""
  cfg = config.get("memory", None) or {}
  return {**MEMORY_DEFAULTS, **(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))}


def uses_memory(config) -> bool:
  return int(memory_settings(config)["size"]) > 0


def init_memory(config, dim: int) -> dict:
  if not uses_memory(config):
    return {}
  return memory_lib.init(int(memory_settings(config)["size"]), dim)


def progress(config, step):
  """Training progress in [0, 1], what losses that consume "progress" get.

  With `config.epoch_steps` (steps per epoch) it is completed epochs over
  epochs, constant within an epoch (OBD-SD's ramp); without, step / steps.
  """
  epoch_steps = int(config.get("epoch_steps", 0) or 0)
  if epoch_steps <= 0:
    return jnp.minimum(step / int(config.total_steps), 1.0).astype(jnp.float32)
  epochs = max(1, int(config.total_steps) // epoch_steps)
  return jnp.minimum(step // epoch_steps, epochs).astype(jnp.float32) / epochs


def terms(config) -> list[tuple[str, str, dict, float]]:
  """`config.terms` as `(term name, loss name, hparams, weight)`, in order.

  Each entry of `config.terms` (a dict keyed by term name) is a weighted
  loss added to the ranking loss: `{weight, loss (default: the term's
  name), **hparams}`.
  """
  found = []
  for term, cfg in (config.get("terms", None) or {}).items():
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    weight = float(d.pop("weight", 1.0))
    found.append((term, d.pop("loss", term), d, weight))
  return found


# The key of `config.loss`'s learnable parameters in `state["loss_params"]`
# (terms' parameters are under their term names).
RANKING_LOSS = "loss"


def config_losses(config) -> list[tuple[str, str, dict]]:
  """`(key, loss name, hparams)` of every loss of the config: the ranking
  loss under RANKING_LOSS (when set), then each term under its name."""
  found = []
  if config.get("loss", None) is not None:
    name, hparams = loss_hparams(config.loss)
    found.append((RANKING_LOSS, name, hparams))
  return found + [(term, name, hparams) for term, name, hparams, _ in terms(config)]


def learnable(config) -> list[tuple[str, str, dict]]:
  """`config_losses` that have learnable parameters (kept in
  `state["loss_params"]` by key)."""
  return [x for x in config_losses(config) if "params" in losses.consumes(x[1], x[2])]


def compute_loss(config, outputs, batch: dict, memory: dict, step, teacher_outputs=None,
                 memory_keys=None, loss_params=None):
  """Returns `(loss, aux, new_memory)` for the model outputs of one batch.

  The ranking loss (`config.loss`, may be None) plus every weighted term of
  `config.terms`. Each loss is given what its registry entry says it
  consumes (`jaxdml.losses.consumes`) of what the step has: the teacher's
  outputs on the batch (`teacher_outputs`, or None), the training progress.
  Terms see every row of the batch (both towers for SBIR) and are logged
  as `distill/NAME` (they consume the teacher) or `reg/NAME`.
  `memory_keys`: what the batch enqueues in the cross-batch memory, when not
  its own embeddings (a teacher that feeds the memory). `loss_params`: the
  learnable parameters of the losses that have them, by `learnable` key.
  """
  consumed = set().union(*(losses.consumes(n) for _, n, _ in config_losses(config)))
  available = {"teacher": teacher_outputs,
               "progress": progress(config, step) if "progress" in consumed else None}
  params_of = lambda key: dict(available, params=(loss_params or {}).get(key))
  labels = batch["label"]
  loss, aux = jnp.zeros((), jnp.float32), {}
  if config.get("loss", None) is not None:
    name, hparams = loss_hparams(config.loss)
    miner = hparams.pop("miner", None)  # {"name": ..., **hparams}: mines every call's pairs
    hparams.update(losses.inputs_for(name, params_of(RANKING_LOSS), hparams))
    loss_fn = losses.get(name)
    if miner is not None:
      loss_fn = miners.with_miner(loss_fn, miner)
    if config.task == "sbir":
      loss, aux = loss_fn(embeddings=outputs["query"], labels=labels,
                          ref_embeddings=outputs["gallery"], ref_labels=labels, **hparams)
    elif uses_memory(config):
      if "reference_set" not in losses.consumes(name):
        raise ValueError(f"config.memory needs a ranking loss that takes a reference set; "
                         f"{name!r} does not (jaxdml.losses.consumes).")
      keys = outputs if memory_keys is None else memory_keys
      loss, aux, memory = _memory_loss(config, loss_fn, hparams, outputs, labels, memory,
                                       step, batch_keys=keys)
    else:
      loss, aux = loss_fn(embeddings=outputs, labels=labels, **hparams)
  aux = {f"loss/{k}": v for k, v in aux.items()}
  if uses_memory(config) and config.task != "sbir":
    aux["memory_fill"] = jnp.mean(memory["valid"].astype(jnp.float32))
  all_labels = jnp.concatenate([labels, labels]) if config.task == "sbir" else labels
  flat_teacher = None if teacher_outputs is None else flat(config.task, teacher_outputs)
  for term, name, hparams, weight in terms(config):
    hparams.update(losses.inputs_for(name, dict(params_of(term), teacher=flat_teacher),
                                     hparams))
    value, term_aux = losses.get(name)(embeddings=flat(config.task, outputs),
                                       labels=all_labels, **hparams)
    prefix = "distill" if "teacher" in losses.consumes(name) else "reg"
    aux[f"{prefix}/{term}"] = value
    aux.update({f"{prefix}/{k}": v for k, v in term_aux.items()})
    loss = loss + weight * value
  return loss, aux, memory


MEMORY_TERMS = ("joint", "xbm", "pml")


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
  - "pml": PML's `CrossBatchMemory`: the batch enqueued first, one loss of
    the batch against the whole memory (its own copies dropped), no batch
    term; older slots count from `memory.start_step` (PML: from the start).
  `batch_keys` are the batch's entries in the reference set and what is
  enqueued: the embeddings themselves, or a momentum encoder's. Before
  `memory.start_step` the memory slots are masked out rather than skipped,
  so the step compiles once and its shapes never change.
  """
  cfg = memory_settings(config)
  terms = cfg["terms"]
  if terms not in MEMORY_TERMS:
    raise ValueError(f"config.memory.terms={terms!r}: expected one of {MEMORY_TERMS} "
                     "(see jaxdml.tasks._memory_loss).")
  adapt_hparams = dict(cfg["adapt_hparams"] or {})
  method = cfg["adapt"]
  diagnostics = {}
  if method == "kalman":  # Logged: does the filter's noise model fit training?
    nis = memory_lib.kalman_innovations(memory, batch_keys, **adapt_hparams)
    diagnostics = {f"memory/kalman_nis_{k}": v for k, v in nis.items()}
  adapted, adapted_memory = memory_lib.adapt(memory, batch_keys, method=method, **adapt_hparams)
  batch_size = embeddings.shape[0]
  active = step >= int(cfg["start_step"])
  keys = jax.lax.stop_gradient(batch_keys)
  if terms == "pml":
    ref = memory_lib.enqueued_reference_set(adapted_memory, adapted, keys, labels)
    size = ref["ref_valid"].shape[0]
    slots = jnp.where(ref["ref_self_index"] >= 0, ref["ref_self_index"], size)
    own = jnp.zeros((size,), bool).at[slots].set(True, mode="drop")
    ref["ref_valid"] = ref["ref_valid"] & (active | own)
    loss, aux = loss_fn(embeddings=embeddings, labels=labels, **ref, **hparams)
    return loss, {**aux, **diagnostics}, memory_lib.enqueue(adapted_memory, keys, labels)
  if terms == "xbm":
    loss, aux = loss_fn(embeddings=embeddings, labels=labels, **hparams)
    ref = memory_lib.enqueued_reference_set(adapted_memory, adapted, keys, labels)
    ref["ref_valid"] = ref["ref_valid"] & active
    memory_loss, memory_aux = loss_fn(embeddings=embeddings, labels=labels, **ref, **hparams)
    aux = {**aux, "batch_term": loss, "memory_term": memory_loss,
           **{f"memory/{k}": v for k, v in memory_aux.items()}}
    enqueued = memory_lib.enqueue(adapted_memory, keys, labels)
    memory = jax.tree.map(lambda new, old: jnp.where(active, new, old), enqueued, adapted_memory)
    return loss + float(cfg["weight"]) * memory_loss, {**aux, **diagnostics}, memory
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
