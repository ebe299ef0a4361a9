"""The objective: what a batch's model outputs cost, built once from the config.

    objective = Objective.from_config(config)      # the build layer does this
    loss, aux, memory = objective(outputs, labels, memory, step, ...)

It holds the ranking loss (`config.loss`, with its miner, or None) and the
weighted terms (`config.terms`: distillation, regularisers), each with its
function, hyperparameters and weight; the cross-batch memory's settings
(`config.memory`, `jaxdml.memory.Settings`) and the schedule the training
progress is read from. The train step calls it and never reads the config.

What each loss is given comes from the loss registry (`jaxdml.losses.
consumes`): the teacher's outputs on the batch, the training progress, its
learnable parameters, a reference set (the SBIR gallery tower, or the
memory). No loss or teacher is named here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdml import losses, memory as memory_lib, tasks
from jaxdml.config import as_dict
from jaxdml.losses import miners

# The key of `config.loss`'s learnable parameters in `state["loss_params"]`
# (terms' parameters are under their term names).
RANKING_LOSS = "loss"


def loss_hparams(cfg) -> tuple[str, dict]:
  """Splits a `{name, **hparams}` config into the name and the keywords."""
  d = as_dict(cfg)
  name = d.pop("name")
  d.pop("weight", None)
  return name, d


def progress(step, *, total_steps: int, epoch_steps: int = 0):
  """Training progress in [0, 1], what losses that consume "progress" get.

  With `epoch_steps` (steps per epoch) it is completed epochs over epochs,
  constant within an epoch (OBD-SD's ramp); without, step / steps.
  """
  if epoch_steps <= 0:
    return jnp.minimum(step / total_steps, 1.0).astype(jnp.float32)
  epochs = max(1, total_steps // epoch_steps)
  return jnp.minimum(step // epoch_steps, epochs).astype(jnp.float32) / epochs


@dataclasses.dataclass(frozen=True)
class Term:
  """One loss of the objective. `key` names its learnable parameters in the
  state (RANKING_LOSS for the ranking loss, else the term's name); `log`
  is where its value is logged (None: the ranking loss, under `loss/`)."""
  key: str
  name: str
  hparams: dict
  weight: float = 1.0
  miner: Any = None  # {"name": ..., **hparams}: mines every call's pairs (ranking loss)
  log: str | None = None

  @property
  def fn(self):
    fn = losses.get(self.name)
    return fn if self.miner is None else miners.with_miner(fn, self.miner)

  def consumes(self) -> frozenset:
    return losses.consumes(self.name, self.hparams)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The ranking loss (or None) plus the weighted terms, on one task's outputs."""
  task: str
  ranking: Term | None
  terms: tuple
  memory: memory_lib.Settings
  total_steps: int
  epoch_steps: int = 0

  @classmethod
  def from_config(cls, config) -> "Objective":
    """From a resolved config's `loss`, `terms`, `memory`, `task`,
    `total_steps` and `epoch_steps`."""
    ranking = None
    if config.get("loss") is not None:
      name, hparams = loss_hparams(config.loss)
      ranking = Term(RANKING_LOSS, name, hparams, miner=hparams.pop("miner", None))
    terms = []
    for term, cfg in as_dict(config.get("terms")).items():
      d = dict(cfg)
      weight = float(d.pop("weight", 1.0))
      name = d.pop("loss", term)
      prefix = "distill" if "teacher" in losses.consumes(name) else "reg"
      terms.append(Term(term, name, d, weight, log=f"{prefix}/{term}"))
    objective = cls(task=config.task, ranking=ranking, terms=tuple(terms),
                    memory=memory_lib.Settings.from_config(config.get("memory")),
                    total_steps=int(config.get("total_steps", 0) or 0),
                    epoch_steps=int(config.get("epoch_steps", 0) or 0))
    if (objective.uses_memory and config.task != "sbir" and ranking is not None
        and "reference_set" not in losses.consumes(ranking.name)):
      raise ValueError(f"config.memory needs a ranking loss that takes a reference set; "
                       f"{ranking.name!r} does not (jaxdml.losses.consumes).")
    return objective

  @property
  def all_terms(self) -> tuple:
    return ((self.ranking,) if self.ranking is not None else ()) + self.terms

  @property
  def uses_memory(self) -> bool:
    return self.memory.size > 0

  @property
  def consumed(self) -> frozenset:
    """Everything any of its losses consumes (keys of `losses.INPUTS`)."""
    return frozenset().union(*(t.consumes() for t in self.all_terms))

  @property
  def learnable(self) -> list[tuple[str, str, dict]]:
    """`(key, loss name, hparams)` of the losses with learnable parameters
    (kept in `state["loss_params"]` by key)."""
    return [(t.key, t.name, t.hparams) for t in self.all_terms if "params" in t.consumes()]

  def init_memory(self, dim: int) -> dict:
    return memory_lib.init(self.memory.size, dim) if self.uses_memory else {}

  def init_loss_params(self, rng, *, num_classes: int, dim: int) -> dict:
    keys = jax.random.split(rng, max(1, len(self.learnable)))
    return {key: losses.init_params(name, k, num_classes=num_classes, dim=dim, **hparams)
            for (key, name, hparams), k in zip(self.learnable, keys)}

  def progress(self, step):
    if self.total_steps <= 0:
      raise ValueError("a loss consumes the training progress: config.total_steps must be "
                       "positive.")
    return progress(step, total_steps=self.total_steps, epoch_steps=self.epoch_steps)

  def __call__(self, outputs, labels, memory: dict, step, teacher_outputs=None,
               memory_keys=None, loss_params=None):
    """Returns `(loss, aux, new_memory)` for the model outputs of one batch.

    Each loss is given what it consumes of what the step has: the teacher's
    outputs on the batch (`teacher_outputs`, or None), the training
    progress, its learnable parameters (`loss_params`, by key). Terms see
    every row of the batch (both towers for SBIR) and are logged as
    `distill/NAME` (they consume the teacher) or `reg/NAME`. `memory_keys`:
    what the batch enqueues in the cross-batch memory, when not its own
    embeddings (a teacher that feeds the memory).
    """
    available = {"teacher": teacher_outputs,
                 "progress": self.progress(step) if "progress" in self.consumed else None}
    inputs = lambda term, teacher: losses.inputs_for(
        term.name, dict(available, teacher=teacher, params=(loss_params or {}).get(term.key)),
        term.hparams)
    loss, aux = jnp.zeros((), jnp.float32), {}
    if self.ranking is not None:
      term = self.ranking
      hparams = {**term.hparams, **inputs(term, teacher_outputs)}
      if self.task == "sbir":
        loss, aux = term.fn(embeddings=outputs["query"], labels=labels,
                            ref_embeddings=outputs["gallery"], ref_labels=labels, **hparams)
      elif self.uses_memory:
        keys = outputs if memory_keys is None else memory_keys
        loss, aux, memory = memory_lib.loss_with_memory(
            self.memory, term.fn, hparams, outputs, labels, memory, step, batch_keys=keys)
      else:
        loss, aux = term.fn(embeddings=outputs, labels=labels, **hparams)
    aux = {f"loss/{k}": v for k, v in aux.items()}
    if self.uses_memory and self.task != "sbir":
      aux["memory_fill"] = jnp.mean(memory["valid"].astype(jnp.float32))
    all_labels = jnp.concatenate([labels, labels]) if self.task == "sbir" else labels
    flat_teacher = None if teacher_outputs is None else tasks.flat(self.task, teacher_outputs)
    for term in self.terms:
      value, term_aux = term.fn(embeddings=tasks.flat(self.task, outputs), labels=all_labels,
                                **term.hparams, **inputs(term, flat_teacher))
      prefix = term.log.partition("/")[0]
      aux[term.log] = value
      aux.update({f"{prefix}/{k}": v for k, v in term_aux.items()})
      loss = loss + term.weight * value
    return loss, aux, memory
