"""Loss wrappers: pytorch-metric-learning 2.9.0's `SelfSupervisedLoss` and
`MultipleLosses`, as functions that return losses with the usual contract
(`loss, aux = fn(*, embeddings, labels, ...)`), so they can be registered
and jitted:

  ssl = wrappers.self_supervised("ntxent")
  loss, aux = ssl(embeddings=view_1, ref_embeddings=view_2)
  losses.register("my_ssl", ssl)

  both = wrappers.multiple({"c": "contrastive", "t": dict(name="triplet", margin=0.1)},
                           weights={"c": 1.0, "t": 0.5}, miners={"t": "batch_hard"})

A loss is given as a registered name, a dict {"name": ..., **hparams} (a
config's form) or a function with the loss contract (bind hyperparameters
with functools.partial).
"""
import functools
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp

from jaxdml import sharding
from jaxdml.losses import miners as miners_lib

LossLike = Union[str, Mapping[str, Any], Callable]

# PML's `SelfSupervisedLoss.supported_losses()`, by jaxdml name.
SELF_SUPERVISED_LOSSES = (
    "angular", "circle", "contrastive", "generalized_lifted_structure", "intra_pair_variance",
    "lifted_structure", "multi_similarity", "nca", "ntxent", "snr_contrastive", "supcon",
    "triplet", "tuplet_margin")


def _resolve(loss: LossLike, wrapper: str) -> tuple[str | None, Callable]:
  """(registered name or None, function) of a loss given as a name, a
  {"name": ..., **hparams} dict or a function."""
  from jaxdml import losses as registry  # pylint: disable=import-outside-toplevel
  if isinstance(loss, str):
    return loss, registry.get(loss)
  if isinstance(loss, Mapping) or hasattr(loss, "to_dict"):
    spec = dict(loss.to_dict() if hasattr(loss, "to_dict") else loss)
    if "name" not in spec:
      raise ValueError(f"{wrapper}: a loss given as a dict needs its 'name', got {spec}.")
    name = spec.pop("name")
    return name, functools.partial(registry.get(name), **spec)
  if callable(loss):
    return None, loss
  raise ValueError(f"{wrapper}: a loss is a registered name, a dict(name=..., **hparams) "
                   f"or a function, got {loss!r}.")


def _name_of(fn: Callable) -> str:
  while isinstance(fn, functools.partial):
    fn = fn.func
  return getattr(fn, "__name__", "loss")


def self_supervised(loss: LossLike, symmetric: bool = True) -> Callable:
  """PML's `SelfSupervisedLoss(loss, symmetric)`: `embeddings` and
  `ref_embeddings` ([B, D] each) are two views of the same B items, row i of
  each is item i; the labels are made here (item i is class i).
  `symmetric=True`: the loss sees the 2B rows as one batch (each view's
  positive is the other view of its item); False: `embeddings` are the
  anchors and `ref_embeddings` the reference set. A named loss must be one
  PML's wrapper supports (SELF_SUPERVISED_LOSSES); a function is taken as
  is. The returned loss ignores `labels` (a train step may pass the batch's).
  """
  name, fn = _resolve(loss, "self_supervised")
  if name is not None and name not in SELF_SUPERVISED_LOSSES:
    raise ValueError(f"self_supervised does not support loss {name!r} (PML's "
                     f"SelfSupervisedLoss neither); use one of {SELF_SUPERVISED_LOSSES}.")

  @sharding.on_any_mesh  # a function loss too: the views are joined here
  def self_supervised_loss(*, embeddings, ref_embeddings=None, labels=None, ref_labels=None,
                           ref_valid=None, ref_self_index=None, **kwargs):
    del labels  # the views' rows say which items match
    if ref_embeddings is None:
      raise ValueError("self_supervised needs ref_embeddings: the second view of the "
                       "embeddings' items, row for row.")
    if any(r is not None for r in (ref_labels, ref_valid, ref_self_index)):
      raise ValueError("self_supervised makes the labels itself; drop ref_labels, "
                       "ref_valid and ref_self_index.")
    if jnp.shape(embeddings) != jnp.shape(ref_embeddings) or jnp.ndim(embeddings) != 2:
      raise ValueError(f"self_supervised: embeddings {jnp.shape(embeddings)} and "
                       f"ref_embeddings {jnp.shape(ref_embeddings)} must both be [B, D]: "
                       "two views of the same items.")
    items = jnp.arange(jnp.shape(embeddings)[0])
    if symmetric:
      return fn(embeddings=jnp.concatenate([embeddings, ref_embeddings]),
                labels=jnp.concatenate([items, items]), **kwargs)
    return fn(embeddings=embeddings, labels=items, ref_embeddings=ref_embeddings,
              ref_labels=items, **kwargs)
  return self_supervised_loss


def _per_term(value, keys, what, match_all):
  """`value` (a list by position or a dict by key) as {key: entry}."""
  if isinstance(value, Mapping):
    extra = sorted(set(value) - set(keys))
    missing = sorted(set(keys) - set(value)) if match_all else []
    if extra or missing or not isinstance(keys[0], str):
      raise ValueError(f"multiple: {what} must be a dict with the losses' keys "
                       f"{list(keys)} ({'all' if match_all else 'a subset'}), got "
                       f"{sorted(value, key=str)}.")
    return dict(value)
  if isinstance(value, (str, bytes)) or len(value) != len(keys) or isinstance(keys[0], str):
    raise ValueError(f"multiple: {what} must be a list as long as the losses "
                     f"({len(keys)}), or a dict when the losses are one.")
  return dict(zip(keys, value))


def multiple(losses: Union[Sequence[LossLike], Mapping[str, LossLike]],
             weights: Union[Sequence[float], Mapping[str, float], None] = None,
             miners: Union[Sequence[Any], Mapping[str, Any], None] = None) -> Callable:
  """PML's `MultipleLosses(losses, miners, weights)`: sum_i weights[i] *
  losses[i], each term called with the same arguments.

  `losses` is a list or a dict of losses (a name, a dict(name=...,
  **hparams), or a function); `weights` (default 1) and `miners` follow the
  same form: a list as long as the losses, or a dict with the same keys
  (weights: all of them; miners: any of them). A miner (a name, a
  dict(name=..., **hparams) or a miner function; None for none) mines that
  term's pairs from the call's inputs, as `miners.with_miner`; with miners a
  call takes no `mined=`, otherwise its `mined=` goes to every term, as PML.

  aux holds each term's value (unweighted) under its key (the dict's key;
  in a list, the loss's name, with its position appended when two terms
  share one) and the term's own aux as "key/name".
  """
  if isinstance(losses, Mapping):
    keys = list(losses)
    if not keys or not all(isinstance(k, str) for k in keys):
      raise ValueError(f"multiple: a dict of losses needs string keys, got {keys}.")
    resolved = [_resolve(losses[k], "multiple") for k in keys]
    aux_keys = keys
  else:
    losses = list(losses)
    if not losses:
      raise ValueError("multiple: give at least one loss.")
    keys = list(range(len(losses)))
    resolved = [_resolve(loss, "multiple") for loss in losses]
    names = [name or _name_of(fn) for name, fn in resolved]
    aux_keys = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
  weight_of = ({k: 1.0 for k in keys} if weights is None
               else _per_term(weights, keys, "weights", match_all=True))
  miner_of = {} if miners is None else _per_term(miners, keys, "miners", match_all=False)
  terms = []
  for key, label, (_, fn) in zip(keys, aux_keys, resolved):
    miner = miner_of.get(key)
    terms.append((label, weight_of[key], fn if miner is None else
                   miners_lib.with_miner(fn, miner)))
  has_miners = any(m is not None for m in miner_of.values())

  @sharding.on_any_mesh
  def multiple_losses(*, embeddings, labels, **kwargs):
    if kwargs.get("mined", 0) is None:
      del kwargs["mined"]
    if has_miners and "mined" in kwargs:
      raise ValueError("multiple: the terms have their own miners; call without mined=, "
                       "or build multiple(...) without miners=.")
    total, aux = 0.0, {}
    for label, weight, fn in terms:
      value, term_aux = fn(embeddings=embeddings, labels=labels, **kwargs)
      total = total + weight * value
      aux[label] = value
      aux.update({f"{label}/{k}": v for k, v in term_aux.items()})
    return total, aux
  return multiple_losses
