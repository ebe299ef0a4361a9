"""The objective: what a batch's model outputs cost, built once from the config.

    objective = Objective.from_config(config)      # the build layer does this
    loss, aux, memory, loss_state = objective(outputs, labels, memory, step, ...,
                                              rng=rng, loss_state=loss_state)

It holds the ranking loss (`config.loss`, with its miner, or None) and the
weighted terms (`config.terms`: distillation, regularisers), each with its
function, hyperparameters and weight; the cross-batch memory's settings
(`config.memory`, `jaxdml.memory.Settings`), the views per image
(`config.data.views.num`) and the schedule the training progress is read
from. The train step calls it and never reads the config.

What each loss is given comes from the loss registry (`jaxdml.losses.
consumes`): the teacher's outputs on the batch, the training progress, its
learnable parameters, a reference set (the SBIR gallery tower, or the
memory), a random key, its running state. Random keys: a loss that
consumes "rng" gets `fold_in(rng, tag)`, the step's key folded with a tag
of the term's key, so each term draws afresh every step and two terms never
share draws. Running state: a loss that consumes "state" is given
`loss_state[term key]` (made by `init_loss_state`, kept by the train state
under `loss_state`) and the call returns the next one. Two views: the
losses in TWO_VIEW_LOSSES compare two views of each image
(`config.data.views = dict(num=2)`: rows 2i and 2i + 1 are image i's
views); the objective passes the first views as `embeddings` and the
second as `ref_embeddings`. The PML wrappers `self_supervised` and
`multiple` (`jaxdml.losses.wrappers`) are built from their config, e.g.
`config.loss = dict(name="self_supervised", loss=dict(name="ntxent"))`.
Settings that cannot work together are a ValueError in `from_config`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxdml import losses, memory as memory_lib, tasks
from jaxdml.config import LOSS_WRAPPERS as WRAPPERS, as_dict, loss_names
from jaxdml.losses import miners

# The key of `config.loss`'s learnable parameters in `state["loss_params"]`
# (terms' parameters are under their term names).
RANKING_LOSS = "loss"
# Losses whose `ref_embeddings` is a second view of the batch's images, not a
# reference set; the registry records no such input, so it is listed here.
TWO_VIEW_LOSSES = ("vicreg", "self_supervised")


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
  """One loss of the objective. `key` names its learnable parameters and
  running state in the state (RANKING_LOSS for the ranking loss, else the
  term's name); `log` is where its value is logged (None: the ranking
  loss, under `loss/`). For a wrapper (WRAPPERS), `hparams` are the
  wrapper's arguments."""
  key: str
  name: str
  hparams: dict
  weight: float = 1.0
  miner: Any = None  # {"name": ..., **hparams}: mines every call's pairs (ranking loss)
  log: str | None = None

  @property
  def fn(self):
    return self.fn_with()

  @property
  def loss_fn(self):
    """The loss without its miner (a wrapper built from its arguments)."""
    if self.name in WRAPPERS:
      return getattr(losses, self.name)(**self.hparams)
    return losses.get(self.name)

  def fn_with(self, rng=None):
    """The loss, mining first with its miner; a sampling miner draws from `rng`."""
    fn = self.loss_fn
    return fn if self.miner is None else miners.with_miner(fn, self.miner, rng=rng)

  @property
  def call_hparams(self) -> dict:
    """The keywords every call passes (a wrapper's are bound when it is built)."""
    return {} if self.name in WRAPPERS else self.hparams

  def consumes(self) -> frozenset:
    """What it takes (keys of `losses.INPUTS`); "rng" also for a sampling miner."""
    return self._consumes() | ({"rng"} if miners.samples(self.miner) else frozenset())

  def _consumes(self) -> frozenset:
    if self.name == "self_supervised":
      return frozenset()  # it makes the labels and rejects a reference set
    if self.name == "multiple":
      # Every wrapped loss gets the same arguments: a reference set only if
      # all take one (from_config refuses anything else).
      inner = [losses.consumes(n) for n in loss_names(dict(self.hparams, name=self.name))]
      return frozenset.intersection(*inner) if inner else frozenset()
    return losses.consumes(self.name, self.hparams)

  def inputs(self, available: dict) -> dict:
    """The keywords of `available` (INPUTS key -> value) the loss itself
    consumes (a sampling miner's key is bound by `fn_with`)."""
    return {} if self.name in WRAPPERS else losses.inputs_for(self.name, available,
                                                              self.hparams)

  @property
  def rng_tag(self) -> int:
    """What the step's key is folded with for this term: its key's CRC, so a
    term's draws do not change when other terms are added."""
    return zlib.crc32(self.key.encode()) & 0x7FFFFFFF

  def check(self, where: str) -> None:
    """ValueError for a wrapper whose arguments cannot be built."""
    if self.name not in WRAPPERS:
      return
    inner_names = loss_names(dict(self.hparams, name=self.name))
    try:
      self.loss_fn  # pylint: disable=pointless-statement  (building checks the args)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {self.name}(...) cannot be built: {e} (see "
                       f"jaxdml.losses.wrappers.{self.name}).") from None
    if self.name == "multiple":
      for inner in inner_names:
        extra = sorted(losses.consumes(inner) - {"reference_set"})
        if extra:
          raise ValueError(f"{where}: multiple gives every loss the same arguments, and "
                           f"{inner!r} consumes {extra}; make it config.loss or one of "
                           "config.terms instead.")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The ranking loss (or None) plus the weighted terms, on one task's outputs."""
  task: str
  ranking: Term | None
  terms: tuple
  memory: memory_lib.Settings
  total_steps: int
  epoch_steps: int = 0
  views: int = 1  # consecutive rows per image (config.data.views.num)

  @classmethod
  def from_config(cls, config) -> "Objective":
    """From a resolved config's `loss`, `terms`, `memory`, `task`,
    `total_steps`, `epoch_steps` and `data.views`."""
    ranking = None
    if config.get("loss") is not None:
      name, hparams = loss_hparams(config.loss)
      ranking = Term(RANKING_LOSS, name, hparams, miner=hparams.pop("miner", None))
      ranking.check("config.loss")
    terms = []
    for term, cfg in as_dict(config.get("terms")).items():
      d = dict(cfg)
      weight = float(d.pop("weight", 1.0))
      name = d.pop("loss", term)
      prefix = "distill" if "teacher" in losses.consumes(name) else "reg"
      terms.append(Term(term, name, d, weight, log=f"{prefix}/{term}"))
      if name in WRAPPERS or name in TWO_VIEW_LOSSES:
        raise ValueError(f"config.terms.{term}: {name!r} is taken as config.loss only.")
    views = as_dict(as_dict(config.get("data")).get("views"))
    objective = cls(task=config.task, ranking=ranking, terms=tuple(terms),
                    memory=memory_lib.Settings.from_config(config.get("memory")),
                    total_steps=int(config.get("total_steps", 0) or 0),
                    epoch_steps=int(config.get("epoch_steps", 0) or 0),
                    views=int(views.get("num", 1) or 1))
    objective.check()
    return objective

  def check(self) -> None:
    """One ValueError for settings that cannot work together."""
    ranking = self.ranking
    if ranking is None:
      return
    if (self.uses_memory and self.task != "sbir"
        and "reference_set" not in ranking.consumes()):
      raise ValueError(f"config.memory needs a ranking loss that takes a reference set; "
                       f"{ranking.name!r} does not (jaxdml.losses.consumes).")
    if self.uses_memory and self.task != "sbir" and "state" in ranking.consumes():
      raise ValueError(f"{ranking.name!r} keeps running state, which the cross-batch memory "
                       "does not carry: set config.memory.size = 0.")
    if self.two_views:
      if self.task != "single" or self.uses_memory:
        raise ValueError(f"{ranking.name!r} compares two views of each image: it needs "
                         "task='single' without config.memory.")
      if self.views != 2:
        raise ValueError(f"{ranking.name!r} compares two views of each image: set "
                         "config.data.views = dict(num=2) (two augmentations per image), "
                         f"not {self.views} view(s).")

  @property
  def all_terms(self) -> tuple:
    return ((self.ranking,) if self.ranking is not None else ()) + self.terms

  @property
  def uses_memory(self) -> bool:
    return self.memory.size > 0

  @property
  def two_views(self) -> bool:
    """Whether the ranking loss takes the second views as `ref_embeddings`."""
    return self.ranking is not None and self.ranking.name in TWO_VIEW_LOSSES

  @property
  def consumed(self) -> frozenset:
    """Everything any of its losses consumes (keys of `losses.INPUTS`)."""
    return frozenset().union(*(t.consumes() for t in self.all_terms))

  @property
  def learnable(self) -> list[tuple[str, str, dict]]:
    """`(key, loss name, hparams)` of the losses with learnable parameters
    (kept in `state["loss_params"]` by key)."""
    return [(t.key, t.name, t.hparams) for t in self.all_terms if "params" in t.consumes()]

  @property
  def stateful(self) -> list[tuple[str, str, dict]]:
    """`(key, loss name, hparams)` of the losses with running state (kept in
    `state["loss_state"]` by key)."""
    return [(t.key, t.name, t.hparams) for t in self.all_terms if "state" in t.consumes()]

  def init_memory(self, dim: int) -> dict:
    return memory_lib.init(self.memory.size, dim) if self.uses_memory else {}

  def init_loss_params(self, rng, *, num_classes: int, dim: int) -> dict:
    keys = jax.random.split(rng, max(1, len(self.learnable)))
    return {key: losses.init_params(name, k, num_classes=num_classes, dim=dim, **hparams)
            for (key, name, hparams), k in zip(self.learnable, keys)}

  def init_loss_state(self) -> dict:
    """The running state of each stateful loss, by key (`losses.init_state`)."""
    return {key: losses.init_state(name, **hparams) for key, name, hparams in self.stateful}

  def progress(self, step):
    if self.total_steps <= 0:
      raise ValueError("a loss consumes the training progress: config.total_steps must be "
                       "positive.")
    return progress(step, total_steps=self.total_steps, epoch_steps=self.epoch_steps)

  def __call__(self, outputs, labels, memory: dict, step, teacher_outputs=None,
               memory_keys=None, loss_params=None, *, rng=None, loss_state=None):
    """Returns `(loss, aux, new_memory, new_loss_state)` for the model outputs
    of one batch.

    Each loss is given what it consumes of what the step has: the teacher's
    outputs on the batch (`teacher_outputs`, or None), the training
    progress, its learnable parameters (`loss_params`, by key), a key of its
    own folded from `rng`, its running state (`loss_state`, by key; the
    next one is returned, the others as they were). Terms see every row of
    the batch (both towers for SBIR) and are logged as `distill/NAME` (they
    consume the teacher) or `reg/NAME`. `memory_keys`: what the batch
    enqueues in the cross-batch memory, when not its own embeddings (a
    teacher that feeds the memory).
    """
    loss_state = dict(loss_state or {})
    missing = [key for key, _, _ in self.stateful if key not in loss_state]
    if missing:
      raise ValueError(f"the losses {missing} keep running state: pass loss_state= "
                       "(Objective.init_loss_state(), then what the last call returned).")
    available = {"teacher": teacher_outputs,
                 "progress": self.progress(step) if "progress" in self.consumed else None}

    def own_rng(term, tag=0):
      """The term's key this step (tag 1: its miner's)."""
      if rng is None or "rng" not in term.consumes():
        return None
      return jax.random.fold_in(jax.random.fold_in(rng, term.rng_tag), tag)

    def hparams_of(term, teacher):
      """Its hyperparameters and what it consumes of what the step has."""
      return {**term.call_hparams, **term.inputs(dict(
          available, teacher=teacher, params=(loss_params or {}).get(term.key),
          state=loss_state.get(term.key), rng=own_rng(term)))}

    def call(term, teacher, **arrays):
      """`(value, aux)` of `term`, its running state updated in `loss_state`."""
      result = term.fn_with(own_rng(term, 1))(**arrays, **hparams_of(term, teacher))
      if "state" in term.consumes():
        value, aux, loss_state[term.key] = result
        return value, aux
      return result

    loss, aux = jnp.zeros((), jnp.float32), {}
    if self.ranking is not None:
      term = self.ranking
      if self.task == "sbir":
        loss, aux = call(term, teacher_outputs, embeddings=outputs["query"], labels=labels,
                         ref_embeddings=outputs["gallery"], ref_labels=labels)
      elif self.uses_memory:
        keys = outputs if memory_keys is None else memory_keys
        loss, aux, memory = memory_lib.loss_with_memory(
            self.memory, term.fn_with(own_rng(term, 1)), hparams_of(term, teacher_outputs),
            outputs, labels, memory, step, batch_keys=keys)
      elif self.two_views:  # rows 2i and 2i + 1: image i's two views
        loss, aux = call(term, teacher_outputs, embeddings=outputs[0::2], labels=labels[0::2],
                         ref_embeddings=outputs[1::2])
      else:
        loss, aux = call(term, teacher_outputs, embeddings=outputs, labels=labels)
    aux = {f"loss/{k}": v for k, v in aux.items()}
    if self.uses_memory and self.task != "sbir":
      aux["memory_fill"] = jnp.mean(memory["valid"].astype(jnp.float32))
    all_labels = jnp.concatenate([labels, labels]) if self.task == "sbir" else labels
    flat_teacher = None if teacher_outputs is None else tasks.flat(self.task, teacher_outputs)
    for term in self.terms:
      value, term_aux = call(term, flat_teacher, embeddings=tasks.flat(self.task, outputs),
                             labels=all_labels)
      prefix = term.log.partition("/")[0]
      aux[term.log] = value
      aux.update({f"{prefix}/{k}": v for k, v in term_aux.items()})
      loss = loss + term.weight * value
    return loss, aux, memory, loss_state
