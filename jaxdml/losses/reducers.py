"""PML's reducers as pure functions over a loss's per-element losses.

A loss computes its per-element losses the way pytorch-metric-learning
2.9.0 lists them, as named sub-losses ("loss"; contrastive's "pos_loss" and
"neg_loss"; proxy_anchor's ...), each a `Term`: the losses, which entries
PML lists (`mask`), and PML's reduction type ("element", "pos_pair",
"neg_pair", "triplet" or "already_reduced"). `finish` applies the reducer
the caller chose with `reduction=` to every sub-loss and sums the results,
as PML's `MultipleReducers` does. Dense masks instead of index lists keep
everything static-shape and jit-safe: a pair loss is [B, R] with the anchor
on axis 0, a triplet loss [B, R, R], an element loss [N] (N the batch, or
the proxies for proxy_anchor).

`reduction=` is a name or a dict with the name under "name":
- "avg_nonzero": AvgNonZeroReducer, the mean over entries > 0 (0 if none).
- {"name": "class_weighted", "weights": [C]}: ClassWeightedReducer, the
  mean of loss * weights[label of the entry's anchor].
- "divisor": DivisorReducer, sum / the loss's own divisor (losses that give
  one: proxy_anchor, margin, the sparse_centers regularizer).
- "do_nothing": DoNothingReducer; the loss value is then PML's dict,
  {sub_loss: {"losses", "mask", "reduction_type"}}, not a scalar.
- "mean": MeanReducer. "sum": SumReducer.
- {"name": "per_anchor", "reducer": spec}: PerAnchorReducer; pair losses
  are averaged per anchor (anchors without pairs give 0), then `reducer`
  (default "mean") reduces the anchors. Not defined for triplets (PML).
- {"name": "threshold", "low": a, "high": b}: ThresholdReducer, the mean
  over the entries with a < loss < b (either bound may be left out).
- {"name": "multiple", "reducers": {sub_loss: spec}, "default": spec}:
  MultipleReducers; sub-losses not named use `default` ("mean", as PML).
- "per_anchor_sum" (ours, pair losses only): each anchor's pair losses
  summed, the sums averaged over anchors (XBM's code, IRT's equation).
An "already_reduced" sub-loss is passed through by every reducer, as in PML.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# The spec's names and checks import no JAX, so a config is checked without it.
from jaxdml.losses.reducer_spec import NAMES, Reduction, parse  # pylint: disable=unused-import

# What a loss returns: the scalar loss and its diagnostics by name.
LossAndAux = tuple[jax.Array, dict[str, jax.Array]]

KINDS = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")


class Term(NamedTuple):
  losses: jax.Array  # per-element losses; a scalar for "already_reduced"
  kind: str  # PML's reduction_type
  mask: jax.Array | None = None  # bool, losses' shape: the entries PML lists; all if None
  weight: jax.Array | None = None  # how many times each entry is listed (a miner's repeats)
  divisor: jax.Array | None = None  # DivisorReducer's divisor, where PML's loss gives one
  anchors: jax.Array | None = None  # int, losses' shape: the batch row whose label weighs it


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _anchor_rows(term):
  if term.anchors is not None:
    return term.anchors
  rows = jnp.arange(term.losses.shape[0]).reshape((-1,) + (1,) * (term.losses.ndim - 1))
  return jnp.broadcast_to(rows, term.losses.shape)


def reduce_term(term: Term, spec: dict, labels: jax.Array | None = None,
                loss_name: str = "loss") -> jax.Array:
  """One sub-loss reduced by one (parsed) reducer to a scalar.

  `labels` int [B] (for "class_weighted"); the result a float scalar.
  """
  if term.kind not in KINDS:
    raise ValueError(f"{loss_name}: reduction type {term.kind!r} is not one of {KINDS}.")
  name = spec["name"]
  if term.kind == "already_reduced":
    return jnp.asarray(term.losses)
  losses = term.losses
  mask = jnp.ones(losses.shape, bool) if term.mask is None else term.mask
  weight = jnp.ones(losses.shape, losses.dtype) if term.weight is None else term.weight
  weight = jnp.where(mask, weight, 0.0)
  total = lambda x, keep=mask: jnp.sum(jnp.where(keep, weight * x, 0.0))
  if name == "mean":
    return _ratio(total(losses), jnp.sum(weight))
  if name == "sum":
    return total(losses)
  if name in ("avg_nonzero", "threshold"):
    low = 0.0 if name == "avg_nonzero" else spec.get("low")
    high = None if name == "avg_nonzero" else spec.get("high")
    keep = mask
    if low is not None:
      keep = keep & (losses > low)
    if high is not None:
      keep = keep & (losses < high)
    return _ratio(total(losses, keep), jnp.sum(jnp.where(keep, weight, 0.0)))
  if name == "divisor":
    if term.divisor is None:
      raise ValueError(f"{loss_name}: the divisor reducer needs a loss that gives a divisor "
                       "(proxy_anchor, margin, sparse_centers); pick another reduction.")
    return _ratio(total(losses), jnp.asarray(term.divisor, losses.dtype))
  if name == "class_weighted":
    if labels is None:
      raise ValueError(f"{loss_name}: the class_weighted reducer needs labels.")
    class_w = jnp.asarray(spec["weights"], losses.dtype)[jnp.asarray(labels)[_anchor_rows(term)]]
    return _ratio(total(losses * class_w), jnp.sum(weight))
  if name in ("per_anchor", "per_anchor_sum"):
    if term.kind == "triplet":
      raise ValueError(f"{loss_name}: {name} is not defined for triplet losses (PML raises "
                       "NotImplementedError); pick another reduction.")
    if name == "per_anchor_sum":
      if term.kind == "element":
        raise ValueError(f"{loss_name}: per_anchor_sum is for pair losses only.")
      return jnp.sum(jnp.where(mask, weight * losses, 0.0)) / losses.shape[0]
    if term.kind != "element":
      # PML writes each listed pair once into a [B, R] table: repeats count once.
      row_sum = jnp.sum(jnp.where(mask, losses, 0.0), axis=1)
      term = Term(_ratio(row_sum, jnp.sum(mask, axis=1)), "element")
    return reduce_term(term, spec["reducer"], labels, loss_name)
  raise ValueError(f"{loss_name}: reducer {name!r} reduces several sub-losses; use finish().")


def finish(terms: dict, reduction: Reduction, *, labels: jax.Array | None = None,
           loss_name: str = "loss", zero: jax.Array | None = None) -> tuple[Any, dict[str, Any]]:
  """(value, parts): every sub-loss of `terms` reduced by `reduction` and
  summed, and the reduced sub-losses by name. `zero` (a bool scalar): PML
  returns no losses at all for this batch (value 0). With "do_nothing" the
  value is PML's dict of per-element losses (`mask` in place of indices).

  `terms`: sub-loss name -> `Term` (float losses, bool mask of their shape); `labels` int [B].
  """
  spec = parse(reduction)
  if zero is not None:
    terms = {k: t._replace(
        losses=jnp.where(zero, 0.0, t.losses) if t.kind == "already_reduced" else t.losses,
        mask=None if t.kind == "already_reduced" else
        (jnp.ones(t.losses.shape, bool) if t.mask is None else t.mask) & ~zero)
             for k, t in terms.items()}
  if spec["name"] == "do_nothing":
    out = {}
    for k, t in terms.items():
      mask = jnp.ones(jnp.shape(t.losses), bool) if t.mask is None else t.mask
      out[k] = {"losses": jnp.where(mask, t.losses, 0.0), "mask": mask, "reduction_type": t.kind}
    return out, {}
  parts = {}
  for k, t in terms.items():
    sub = spec
    if spec["name"] == "multiple":
      sub = spec["reducers"].get(k, spec["default"])
    parts[k] = reduce_term(t, sub, labels, loss_name)
  return sum(parts.values()), parts


def check_reducible(reduction: Reduction, default: str, loss_name: str,
                    why: str = "PML computes it already reduced") -> None:
  """For a loss PML gives no per-element losses: only its default reduction."""
  if reduction != default:
    raise ValueError(f"{loss_name}: reduction={reduction!r} is not available ({why}, so "
                     f"PML's reducers leave it as it is); leave the default {default!r}.")
