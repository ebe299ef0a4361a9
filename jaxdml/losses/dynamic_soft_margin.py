"""Dynamic soft margin (Zhang & Rusinkiewicz 2019), PML 2.9.0's
`DynamicSoftMarginLoss`: a triplet loss weighted by a running histogram.

Each triplet's x = d(a, p) - d(a, n) is weighted by the empirical CDF of x
over recent batches, so the triplets that are currently hardest weigh most.
PML keeps that histogram in a buffer (`hist_`) updated with momentum on
every call; here it is explicit state: `init_state(**hparams)` makes it
({"hist": float32 [num_bins]}, zeros as PML's) and the loss, called with
`loss_state=`, returns `(loss, aux, new_state)`. The caller carries
`new_state` to the next call (the train state holds it).

The gradient flows through this call's histogram update, as in PML (the
bin fractions are differentiable), but not into the state carried in:
`new_state` is returned under stop_gradient. PML keeps the autograd graph
on its buffer, so its second `backward()` fails (PML issue #731); with the
buffer detached between calls it computes what this does. In the label-free
mode PML writes into the distance matrix that its backward needs, so it
cannot backward at all; ours has the gradient of PML's formula.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers
from jaxdml.losses import pairs


def init_state(*, min_val: float = -2.0, num_bins: int = 10, momentum: float = 0.01,
               **hparams: Any) -> dict[str, jax.Array]:
  """The empty histogram (PML's `hist_` before the first call): zeros [num_bins].

  float32.
  """
  del min_val, momentum, hparams
  return {"hist": jnp.zeros((int(num_bins),), jnp.float32)}


def _check_distance(distance):
  dist = distances.resolve(distance)
  if dist.kind != "lp" or float(dist.p) != 2.0 or not dist.normalize_embeddings:
    raise ValueError(f"dynamic_soft_margin: distance={distance!r}; PML requires an "
                     "LpDistance with p=2 on L2-normalised rows: use 'euclidean' or "
                     "'squared_euclidean'.")
  return dist


def _descriptor_margins(mat):
  """PML's label-free mode: row i of the two views match; the negative is
  the closest non-matching row or column. [N, N] -> [N]."""
  off = jnp.where(jnp.eye(mat.shape[0], dtype=bool), jnp.inf, mat)
  hardest = jnp.minimum(jnp.min(off, axis=0), jnp.min(off, axis=1))
  return jnp.diagonal(mat) - hardest


def _updated_histogram(hist, margins, weight, min_val, delta, momentum):
  """PML's `update_histogram`: each margin split between its two nearest
  bins (linear interpolation), mixed in with `momentum` (1 for an empty
  histogram), renormalised to sum 1. Margins outside the bins land in the
  first or last (PML indexes out of bounds and fails there)."""
  num_bins = hist.shape[0]
  position = jnp.clip((margins - min_val) / delta, 0.0, num_bins - 1.0)
  lower = jnp.floor(position)
  upper_share = position - lower  # torch.frac: differentiable, as in PML
  lower = lower.astype(jnp.int32)
  momentum = jnp.where(jnp.sum(hist) != 0, momentum, 1.0)
  new = (1.0 - momentum) * hist
  new = new.at[lower].add(momentum * (1.0 - upper_share) * weight, mode="drop")
  new = new.at[lower + 1].add(momentum * upper_share * weight, mode="drop")
  total = jnp.sum(new)
  return new / jnp.where(total > 0, total, 1.0)  # empty: stays 0, not NaN


def dynamic_soft_margin(*, embeddings: jax.Array, loss_state: Mapping[str, jax.Array],
                        labels: jax.Array | None = None, ref_embeddings: jax.Array | None = None,
                        ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
                        ref_self_index: jax.Array | None = None, min_val: float = -2.0,
                        num_bins: int = 10, momentum: float = 0.01,
                        distance: distances.DistanceLike = "euclidean",
                        reduction: reducers.Reduction = "mean"
                        ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """PML's `DynamicSoftMarginLoss(min_val, num_bins, momentum)`.

  Args:
    embeddings: float [B, D].
    loss_state: {"hist": float [num_bins]} from `init_state` or the last call.
    labels: int [B]: every (anchor, positive, negative) triplet of the batch,
      or of the anchors against the reference set (`ref_*` as everywhere in
      jaxdml.losses). None: PML's label-free mode, where `ref_embeddings`
      [B, D] is the matching view (row i matches row i).
    min_val: the histogram covers [min_val, -min_val] in `num_bins` bins.
    momentum: the weight of this batch's histogram.
    distance: "euclidean" (PML's default `LpDistance()`) or
      "squared_euclidean"; PML allows only normalised p=2 distances.

  The loss is the mean over triplets of CDF(x) * x, x = d_ap - d_an, the
  CDF read from the histogram after this batch's update at x's bin. A batch
  without triplets gives 0 and leaves the state as it was (PML too).
  Allocates [B, R, R] (R: the reference rows) with labels, [B, B] without.

  Returns:
    (loss, aux, new_state): aux `triplets`, how many were used.
  """
  reducers.check_reducible(reduction, "mean", "dynamic_soft_margin")
  dist = _check_distance(distance)
  hist = jnp.asarray(loss_state["hist"])
  if hist.shape != (int(num_bins),):
    raise ValueError(f"dynamic_soft_margin: loss_state['hist'] is {hist.shape}, expected "
                     f"({int(num_bins)},): make it with init_state(num_bins={num_bins}).")
  if labels is None:
    pairs.reject_ref("dynamic_soft_margin without labels", ref_labels=ref_labels,
                     ref_valid=ref_valid, ref_self_index=ref_self_index)
    x = distances.as_float(embeddings)
    if ref_embeddings is None or jnp.shape(ref_embeddings) != x.shape:
      raise ValueError("dynamic_soft_margin: without labels, pass the matching view as "
                       f"ref_embeddings of shape {x.shape} (row i matches row i), or pass "
                       "labels.")
    margins = _descriptor_margins(dist.matrix(x, ref_embeddings))
    weight = jnp.ones(margins.shape, margins.dtype)
  else:
    p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                      ref_labels=ref_labels, ref_valid=ref_valid,
                      ref_self_index=ref_self_index, loss_name="dynamic_soft_margin")
    mat = dist.matrix(p.query, p.ref)
    margins = (mat[:, :, None] - mat[:, None, :]).reshape(-1)
    weight = (p.pos[:, :, None] & p.neg[:, None, :]).reshape(-1).astype(mat.dtype)

  delta = 2.0 * abs(min_val) / int(num_bins)
  count = jnp.sum(weight)
  new_hist = _updated_histogram(jax.lax.stop_gradient(hist).astype(margins.dtype), margins,
                                weight, min_val, delta, momentum)
  cdf = jnp.cumsum(new_hist)
  bins = jnp.clip(jnp.floor((margins - min_val) / delta), 0, int(num_bins) - 1)
  weighted = cdf[bins.astype(jnp.int32)] * margins
  loss = jnp.sum(weight * weighted) / jnp.maximum(count, 1.0)
  # No triplets: PML returns zero and leaves its buffer as it was.
  loss = jnp.where(count > 0, loss, 0.0)
  new_hist = jnp.where(count > 0, new_hist, hist)
  return loss, {"triplets": count}, {"hist": jax.lax.stop_gradient(new_hist)}
