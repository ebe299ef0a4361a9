"""Anchor/reference pair masks, input checks and reductions for ranking losses.

Every ranking loss compares anchors (`embeddings`, [B, D]) with a reference
set: the batch itself when `ref_embeddings` is None (an anchor is never paired
with itself, as in PML), otherwise `ref_embeddings` ([R, D]) only, as PML's
`ref_emb`. `ref_valid` (bool [R]) drops empty memory slots and
`ref_self_index` (int [B], -1 for none) drops each anchor's own copy when the
batch is part of the reference set. Masks are static-shape [B, R] booleans, so
everything stays jit-safe.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers

REDUCTIONS = ("avg_nonzero", "mean")
# XBM's code and IRT's equation: each anchor's pair losses summed, then the
# mean over anchors (anchors without pairs count as 0). Pair losses only.
PER_ANCHOR_SUM = "per_anchor_sum"


class Pairs(NamedTuple):
  query: jax.Array  # float [B, D] anchors
  ref: jax.Array  # float [R, D] candidates
  pos: jax.Array  # bool [B, R] same label, valid, not self
  neg: jax.Array  # bool [B, R] different label, valid


def check_reduction(reduction: reducers.Reduction, allowed: tuple[str, ...] = REDUCTIONS) -> None:
  """ValueError naming the choices unless `reduction` is one of `allowed`."""
  if reduction not in allowed:
    raise ValueError(
        f"reduction={reduction!r} is not supported; use one of {allowed}.")


def _check_2d(name, x, loss_name):
  if x.ndim != 2:
    raise ValueError(
        f"{loss_name}: {name} must be [N, D], got shape {x.shape}.")


def _check_labels(name, y, n, loss_name):
  if y.shape != (n,):
    raise ValueError(
        f"{loss_name}: {name} must have shape ({n},) to match the embeddings,"
        f" got {y.shape}.")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(
        f"{loss_name}: {name} must be integer class ids, got {y.dtype}.")


def prepare(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None,
            ref_labels: jax.Array | None, ref_valid: jax.Array | None,
            ref_self_index: jax.Array | None, loss_name: str) -> Pairs:
  """Checks shapes and returns the anchors, candidates and pair masks.

  `embeddings` float [B, D], `labels` int [B]; optional `ref_embeddings` float [R, D],
  `ref_labels` int [R], `ref_valid` bool [R], `ref_self_index` int [B]. Returns `Pairs`: query
  float [B, D], ref float [R, D] (at least float32), pos and neg bool [B, R]; R = B without a
  reference set.
  """
  query = distances.as_float(embeddings)
  _check_2d("embeddings", query, loss_name)
  if labels is None:
    raise ValueError(f"{loss_name}: labels are required.")
  labels = jnp.asarray(labels)
  b = query.shape[0]
  _check_labels("labels", labels, b, loss_name)

  if ref_embeddings is None:
    for name, v in (("ref_labels", ref_labels), ("ref_valid", ref_valid),
                    ("ref_self_index", ref_self_index)):
      if v is not None:
        raise ValueError(
            f"{loss_name}: {name} was given without ref_embeddings; pass the"
            " reference set too, or drop it for in-batch pairs.")
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(b, dtype=bool)
    return Pairs(query, query, same & ~eye, ~same)

  ref = distances.as_float(ref_embeddings)
  _check_2d("ref_embeddings", ref, loss_name)
  if ref.shape[1] != query.shape[1]:
    raise ValueError(
        f"{loss_name}: ref_embeddings have dim {ref.shape[1]} but embeddings"
        f" have dim {query.shape[1]}.")
  r = ref.shape[0]
  if ref_labels is None:
    raise ValueError(f"{loss_name}: ref_embeddings need ref_labels.")
  ref_labels = jnp.asarray(ref_labels)
  _check_labels("ref_labels", ref_labels, r, loss_name)
  valid = jnp.ones((b, r), bool)
  if ref_valid is not None:
    ref_valid = jnp.asarray(ref_valid)
    if ref_valid.shape != (r,) or ref_valid.dtype != jnp.bool_:
      raise ValueError(
          f"{loss_name}: ref_valid must be bool [{r}], got {ref_valid.dtype}"
          f" {ref_valid.shape}.")
    valid = valid & ref_valid[None, :]
  if ref_self_index is not None:
    ref_self_index = jnp.asarray(ref_self_index)
    if (ref_self_index.shape != (b,)
        or not jnp.issubdtype(ref_self_index.dtype, jnp.integer)):
      raise ValueError(
          f"{loss_name}: ref_self_index must be int [{b}] (-1 for none), got"
          f" {ref_self_index.dtype} {ref_self_index.shape}.")
    valid = valid & (jnp.arange(r)[None, :] != ref_self_index[:, None])
  same = labels[:, None] == ref_labels[None, :]
  return Pairs(query, ref, same & valid, ~same & valid)


def reject_ref(loss_name: str, **refs: jax.Array | None) -> None:
  """For losses defined on the batch alone: a reference set is a config bug."""
  given = [k for k, v in refs.items() if v is not None]
  if given:
    raise ValueError(
        f"{loss_name} is computed on the batch alone and takes no reference"
        f" set, but got {', '.join(given)}; drop the memory for this loss.")


def reduce(losses: jax.Array, mask: jax.Array, reduction: reducers.Reduction,
           weight: jax.Array | None = None) -> jax.Array:
  """PML AvgNonZeroReducer ("avg_nonzero"), MeanReducer ("mean") or XBM's sum.

  The PML two average over the entries where `mask` holds ("avg_nonzero"
  also drops entries whose loss is not > 0) and give 0 when none is left, as
  PML does. "per_anchor_sum" sums each row of [B, R] `losses` over `mask`
  and averages the B sums, so more pairs (a larger memory) weigh more.
  `weight`: how many times each entry counts (a miner's pair counts, as
  PML's index lists repeat a pair); 1 where None. Any reducer of
  jaxdml.losses.reducers is accepted; these are the ones losses use here.

  Returns a float scalar.
  """
  kind = "pos_pair" if jnp.ndim(losses) == 2 else "element"
  term = reducers.Term(losses, kind, mask=mask, weight=weight)
  return reducers.reduce_term(term, reducers.parse(reduction))


def count(mask: jax.Array) -> jax.Array:
  """The number of True entries of a bool mask, as a float32 scalar."""
  return jnp.sum(mask).astype(jnp.float32)
