"""Log-sum-exp pair losses: NT-Xent (InfoNCE with labels), SupCon, Circle, Tuplet margin.

Each equals pytorch-metric-learning 2.9.0's `NTXentLoss`, `SupConLoss`,
`CircleLoss` and `TupletMarginLoss` with their default cosine similarity
and reducers, in value and gradient, in-batch or against a reference set
(PML's `ref_emb`; `ref_valid` and `ref_self_index` as everywhere in
jaxdml.losses). All allocate [B, R] (anchors x candidates) and nothing
larger; PML's NT-Xent and Tuplet margin build a [positive pairs, negative
pairs] matrix, which is what runs out of memory for large batches (PML
issue #547).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def masked_logsumexp(z: jax.Array, mask: jax.Array, axis: int = -1,
                     weight: jax.Array | None = None) -> jax.Array:
  """logsumexp of `z` where `mask` holds; -inf (with zero gradient) where
  nothing does. `weight` (> 0 where `mask`): log sum weight * exp(z), a
  term repeated that many times.

  `z` float, `mask` bool and `weight` float of `z`'s shape; `axis` is reduced ([..., N] ->
  [...]).
  """
  if weight is not None:
    z = z + jnp.log(jnp.where(mask, weight, 1.0))
  top = jnp.max(jnp.where(mask, z, -jnp.inf), axis=axis, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  # Masked before exp: an entry left out may be huge, and exp(inf) * 0 in
  # the backward pass would be NaN.
  total = jnp.sum(jnp.exp(jnp.where(mask, z - top, -jnp.inf)), axis=axis)
  present = jnp.any(mask, axis=axis)
  return jnp.where(present, jnp.squeeze(top, axis) + jnp.log(jnp.where(present, total, 1.0)),
                   -jnp.inf)


def ntxent(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
           ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
           ref_self_index: jax.Array | None = None, temperature: float = 0.07,
           mined: miners.Mined | None = None,
           reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """NT-Xent / InfoNCE with labels (PML's `NTXentLoss`).
  `mined`: a miner's pairs, each counted as often as it was mined.

  Every positive pair (a, p) is a softmax over p and the negatives of a,
  cosine / temperature: -log(e^{s_ap} / (e^{s_ap} + sum_n e^{s_an})),
  averaged over positive pairs (MeanReducer). Written as
  softplus(logsumexp_n s_an - s_ap) per [B, R] entry. `reduction`: any of
  jaxdml.losses.reducers, over these pos_pair losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="ntxent")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  logits = distances.cosine_matrix(p.query, p.ref) / temperature
  negatives = masked_logsumexp(logits, neg, weight=neg_w)
  losses = jax.nn.softplus(negatives[:, None] - logits)
  # PML returns zero unless the batch has positive and negative pairs.
  value, _ = reducers.finish(
      {"loss": reducers.Term(losses, "pos_pair", mask=pos, weight=pos_w)}, reduction,
      labels=labels, loss_name="ntxent", zero=~(jnp.any(pos) & jnp.any(neg)))
  return value, {"pos_pairs": jnp.sum(pos_w)}


def supcon(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
           ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
           ref_self_index: jax.Array | None = None, temperature: float = 0.1,
           mined: miners.Mined | None = None,
           reduction: reducers.Reduction = "avg_nonzero") -> reducers.LossAndAux:
  """Supervised contrastive loss (Khosla et al. 2020; PML's `SupConLoss`).
  `mined`: a miner's pairs, as a set.

  For anchor a: minus the mean over its positives p of
  log(e^{s_ap} / sum over its positives and negatives k of e^{s_ak}),
  cosine / temperature; averaged over anchors with a non-zero loss
  (AvgNonZeroReducer). `reduction`: any of jaxdml.losses.reducers, over
  these per-anchor ("element") losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="supcon")
  pos, neg, _, _ = miners.restrict(p, mined)
  logits = distances.cosine_matrix(p.query, p.ref) / temperature
  log_prob = logits - masked_logsumexp(logits, pos | neg)[:, None]
  n_pos = jnp.sum(pos, axis=1)
  tiny = jnp.finfo(logits.dtype).tiny
  per_anchor = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / (n_pos + tiny)
  value, _ = reducers.finish({"loss": reducers.Term(per_anchor, "element")}, reduction,
                             labels=labels, loss_name="supcon",
                             zero=~(jnp.any(pos) & jnp.any(neg)))
  return value, {"anchors_with_positives": jnp.sum(n_pos > 0).astype(jnp.float32)}


def circle(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
           ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
           ref_self_index: jax.Array | None = None, m: float = 0.4, gamma: float = 80.0,
           mined: miners.Mined | None = None,
           reduction: reducers.Reduction = "avg_nonzero") -> reducers.LossAndAux:
  """Circle loss (Sun et al. 2020; PML's `CircleLoss`), pairwise labels.

  Per anchor: softplus(logsumexp_p -gamma a_p (s_p - (1 - m)) +
  logsumexp_n gamma a_n (s_n - m)) with the weights a_p = [1 + m - s_p]_+
  and a_n = [s_n + m]_+ held constant; 0 for an anchor without a positive
  or a negative; averaged over the non-zero anchors (AvgNonZeroReducer).
  `mined`: a miner's pairs, as a set. `reduction`: any of
  jaxdml.losses.reducers, over these per-anchor ("element") losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="circle")
  pos, neg, _, _ = miners.restrict(p, mined)
  s = distances.cosine_matrix(p.query, p.ref)
  fixed = jax.lax.stop_gradient(s)
  pos_logits = -gamma * jax.nn.relu(1.0 + m - fixed) * (s - (1.0 - m))
  neg_logits = gamma * jax.nn.relu(fixed + m) * (s - m)
  both = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  inner = masked_logsumexp(pos_logits, pos) + masked_logsumexp(neg_logits, neg)
  losses = jnp.where(both, jax.nn.softplus(jnp.where(both, inner, 0.0)), 0.0)
  value, _ = reducers.finish({"loss": reducers.Term(losses, "element")}, reduction,
                             labels=labels, loss_name="circle")
  return value, {}


def tuplet_margin(*, embeddings: jax.Array, labels: jax.Array,
                  ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                  ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                  margin: float = 5.73, scale: float = 64.0, mined: miners.Mined | None = None,
                  reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Tuplet margin loss (Yu & Tao 2019; PML's `TupletMarginLoss`); `margin`
  in degrees.

  Each positive pair (a, p) with angle theta: log(1 + sum over a's
  negatives n of exp(scale (s_an - cos(theta - margin)))), averaged over
  positive pairs. cos(theta - m) is computed as c cos m + sqrt(1 - c^2)
  sin m (PML goes through arccos: the same value, a finite gradient at
  c = 1 here). `mined`: a miner's pairs, each counted as often as mined.
  `reduction`: any of jaxdml.losses.reducers, over these pos_pair losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="tuplet_margin")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  rad = math.radians(margin)
  s = distances.cosine_matrix(p.query, p.ref)
  shifted = s * math.cos(rad) + distances.safe_sqrt(1.0 - s * s) * math.sin(rad)
  negatives = masked_logsumexp(scale * s, neg, weight=neg_w)  # per anchor
  # log(1 + sum_n exp(scale s_an - scale cos(theta_ap - m))) per [a, p] entry.
  losses = jax.nn.softplus(negatives[:, None] - scale * shifted)
  value, _ = reducers.finish(
      {"loss": reducers.Term(losses, "pos_pair", mask=pos, weight=pos_w)}, reduction,
      labels=labels, loss_name="tuplet_margin", zero=~(jnp.any(pos) & jnp.any(neg)))
  return value, {}
