"""Listwise average-precision losses: FastAP (Cakir et al. 2019), equal to
pytorch-metric-learning 2.9.0's `FastAPLoss` with its default reducer (the
mean of 1 - AP over the anchors that have one), and Smooth-AP (Brown et al.
2020), equal to its authors' code, which PML's `SmoothAPLoss` equals only
when a batch has as many classes as samples per class (`smooth_ap`).
In-batch only, as in PML.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers
from jaxdml.losses import pairs


def fast_ap(*, embeddings: jax.Array, labels: jax.Array, num_bins: int = 10,
            reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """FastAP: AP from soft histograms of squared distances between
  L2-normalised rows (PML asserts `LpDistance(normalize_embeddings=True)`;
  here the rows are normalised inside), `num_bins` triangular bins on
  [0, 4]. Per anchor with a positive: 1 - sum_k h+_k H+_k / H_k / N+,
  averaged. Allocates [B, B] per bin (PML: [bins + 1, B, B] at once).
  `reduction`: any of jaxdml.losses.reducers over the anchors' ("element")
  losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None, ref_labels=None,
                    ref_valid=None, ref_self_index=None, loss_name="fast_ap")
  unit = distances.l2_normalize(p.query)
  dist = distances.pairwise(unit, unit, distance="squared_euclidean")
  delta = 4.0 / num_bins
  pos_f, neg_f = p.pos.astype(dist.dtype), p.neg.astype(dist.dtype)

  def histograms(k):  # one bin's pulse: [B, B] at a time
    pulse = jax.nn.relu(1.0 - jnp.abs(dist - k * delta) / delta)
    return jnp.sum(pulse * pos_f, axis=1), jnp.sum(pulse * neg_f, axis=1)
  pos_hist, neg_hist = jax.lax.map(histograms, jnp.arange(num_bins + 1, dtype=dist.dtype))
  pos_hist, neg_hist = pos_hist.T, neg_hist.T  # [B, bins + 1]
  h_pos_product = pos_hist * jnp.cumsum(pos_hist, axis=1)
  total = jnp.cumsum(pos_hist + neg_hist, axis=1)
  safe = (h_pos_product > 0) & (total > 0)
  ap_sum = jnp.sum(jnp.where(safe, h_pos_product / jnp.where(safe, total, 1.0), 0.0), axis=1)
  n_pos = jnp.sum(pos_f, axis=1)
  has_pos = n_pos > 0
  losses = jnp.where(has_pos, 1.0 - ap_sum / jnp.where(has_pos, n_pos, 1.0), 0.0)
  count = jnp.sum(has_pos)
  # PML gives 0 when no histogram entry is usable at all.
  value, _ = reducers.finish({"loss": reducers.Term(losses, "element", mask=has_pos)},
                             reduction, labels=labels, loss_name="fast_ap",
                             zero=~jnp.any(safe))
  return value, {"anchors": count.astype(jnp.float32)}


def smooth_ap(*, embeddings: jax.Array, labels: jax.Array, temperature: float = 0.01,
              anchor_chunk: int = 32,
              reduction: reducers.Reduction = "mean") -> tuple[jax.Array, dict]:
  """Smooth-AP: AP with each rank replaced by a sum of sigmoids of cosine
  similarity differences / temperature. For anchor i and positive j
  (its own class, i itself included, as the authors' code does), AP_i =
  mean_j R+(i, j) / R(i, j), R = 1 + sum over the batch (R+: over i's
  class) of sigmoid((s_ik - s_ij) / T), k != j; the loss is
  mean_i (1 - AP_i).

  Args:
    embeddings: float [B, D], L2-normalised here (cosine similarity).
    labels: int [B]; classes in any order and of any sizes.
    temperature: T, the authors' `anneal`.
    anchor_chunk: anchors per step of the [anchor_chunk, B, B] sigmoids.
    reduction: any of jaxdml.losses.reducers over the anchors' 1 - AP
      (PML's "ap_loss", element).

  Returns:
    `(loss, {"mean_ap": ...})`, float32 scalars.

  Equal, value and gradient, to the authors' code (github.com/Andrew-Brown1/
  Smooth_AP, `src/Smooth_AP_loss.py`: `SmoothAP(anneal=T, batch_size=B,
  num_id=C)` on the rows sorted into C classes of equal size; its sigmoid
  clamps |x / T| at 50, a difference below 1e-21). PML 2.9.0's
  `SmoothAPLoss`, which cites that code, sets its `num_id` to B // C, the
  samples per class, so it groups the rows into blocks of C, not of the
  class size: it equals the authors' code (and this) only when C equals the
  samples per class, and differs otherwise (4 classes of 8 in
  tests/test_pml_losses.py: 0.5227 here and in the authors' code, 0.5517 in
  PML; 8 of 4: 0.5466 and 0.5689). PML also requires equal class sizes and
  raises otherwise. Memory: [anchor_chunk, B, B] per step (PML: [B, B, B]).
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None, ref_labels=None,
                    ref_valid=None, ref_self_index=None, loss_name="smooth_ap")
  sims = distances.cosine_matrix(p.query, p.query)
  b = sims.shape[0]
  same = p.pos | jnp.eye(b, dtype=bool)  # i's class, i included
  not_self = ~jnp.eye(b, dtype=bool)  # k != j

  def anchor_ap(args):
    s, cls = args  # [B] similarities of anchor i, [B] its class mask
    sig = jax.nn.sigmoid((s[None, :] - s[:, None]) / temperature) * not_self  # [j, k]
    rank_all = 1.0 + jnp.sum(sig, axis=1)
    rank_pos = 1.0 + jnp.sum(sig * cls[None, :], axis=1)
    return jnp.sum(jnp.where(cls, rank_pos / rank_all, 0.0)) / jnp.sum(cls)
  ap = jax.lax.map(anchor_ap, (sims, same), batch_size=min(anchor_chunk, b))
  value, _ = reducers.finish({"ap_loss": reducers.Term(1.0 - ap, "element")}, reduction,
                             labels=labels, loss_name="smooth_ap")
  return value, {"mean_ap": jnp.mean(ap)}
