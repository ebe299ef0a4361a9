"""Contrastive (pair margin) loss, as pytorch-metric-learning's ContrastiveLoss,
and its SNR form `snr_contrastive` (PML's SignalToNoiseRatioContrastiveLoss).

With a distance d: positives pay [d - pos_margin]_+, negatives
[neg_margin - d]_+. With distance="cosine" (a similarity s) the roles flip as
in PML: positives pay [pos_margin - s]_+, negatives [s - neg_margin]_+. The
IRT / XBM loss is cosine with pos_margin=1 (so 1 - s) and neg_margin=0.5.

Reduction, by default, is PML's: the positive and negative parts are each
reduced on their own (AvgNonZeroReducer: mean over pairs with a positive
loss) and then summed. PML also returns 0 when there is at most one positive
and at most one negative pair; reproduced so numbers compare on tiny batches.

`reduction="per_anchor_sum"` is XBM's code (msight-tech/research-xbm,
`ContrastiveLoss`) and IRT's equation: each anchor's positive and negative
pair losses are summed and the sums averaged over the anchors, so the
thousands of extra pairs a cross-batch memory brings add to the loss instead
of being averaged away. XBM's code charges an active negative s rather than
s - neg_margin: the same gradient, a value higher by neg_margin per active
negative / B (IRT writes [s - beta]_+, as here). No degenerate-batch rule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def contrastive(*, embeddings: jax.Array, labels: jax.Array,
                ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                pos_margin: float = 0.0, neg_margin: float = 1.0,
                distance: distances.DistanceLike = "euclidean",
                reduction: reducers.Reduction = "avg_nonzero",
                mined: miners.Mined | None = None) -> reducers.LossAndAux:
  """Contrastive loss; defaults are PML's `ContrastiveLoss()` numbers.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set; see the `jaxdml.losses` docstring.
    pos_margin, neg_margin: margins (see module docstring for the direction).
    distance: a distance (jaxdml.losses.distances); "euclidean" is PML's
      `LpDistance()`, which L2-normalises the rows first.
    reduction: "avg_nonzero" (PML default) or any reducer of
      jaxdml.losses.reducers, applied to each part ("pos_loss" of kind
      pos_pair, "neg_loss" neg_pair) and summed; "per_anchor_sum" is XBM's
      code, IRT's paper (see the module docstring).
    mined: a miner's selection (jaxdml.losses.miners); each pair counts as
      often as it was mined, as in PML's pair lists.

  Returns:
    (loss, aux) with aux `pos_loss`, `neg_loss` (the reduced parts),
    `num_pos_pairs`, `num_neg_pairs`, `active_pos_fraction`,
    `active_neg_fraction`.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels,
                    ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                    ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="contrastive")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  if distances.is_similarity(distance):
    pos_l = jax.nn.relu(pos_margin - mat)
    neg_l = jax.nn.relu(mat - neg_margin)
  else:
    pos_l = jax.nn.relu(mat - pos_margin)
    neg_l = jax.nn.relu(neg_margin - mat)
  n_pos, n_neg = jnp.sum(pos_w), jnp.sum(neg_w)
  degenerate = ((n_pos <= 1) & (n_neg <= 1)
                & (reducers.parse(reduction)["name"] != "per_anchor_sum"))
  loss, parts = reducers.finish(
      {"pos_loss": reducers.Term(pos_l, "pos_pair", mask=pos, weight=pos_w),
       "neg_loss": reducers.Term(neg_l, "neg_pair", mask=neg, weight=neg_w)},
      reduction, labels=labels, loss_name="contrastive", zero=degenerate)
  pos_loss, neg_loss = parts.get("pos_loss", 0.0), parts.get("neg_loss", 0.0)
  aux = {
      "pos_loss": pos_loss,
      "neg_loss": neg_loss,
      "num_pos_pairs": n_pos,
      "num_neg_pairs": n_neg,
      "active_pos_fraction": jnp.sum(jnp.where(pos_l > 0, pos_w, 0.0))
                             / jnp.maximum(n_pos, 1.0),
      "active_neg_fraction": jnp.sum(jnp.where(neg_l > 0, neg_w, 0.0))
                             / jnp.maximum(n_neg, 1.0),
  }
  return loss, aux


def snr_contrastive(*, embeddings: jax.Array, labels: jax.Array,
                    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                    ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                    pos_margin: float = 0.0, neg_margin: float = 1.0,
                    distance: distances.DistanceLike = "snr", reduction: str = "avg_nonzero",
                    mined: miners.Mined | None = None) -> tuple[jax.Array, dict]:
  """Signal-to-noise ratio contrastive loss (Yuan et al. 2019; PML's
  `SignalToNoiseRatioContrastiveLoss()`): `contrastive` with PML's
  `SNRDistance()`, Var(x_a - x_j) / Var(x_a) between L2-normalised rows.

  `distance` must be an SNR distance, as PML asserts; e.g.
  `dict(name="snr", normalize_embeddings=False)` for raw rows. Arguments,
  reductions and aux are `contrastive`'s.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  if distances.resolve(distance).kind != "snr":
    raise ValueError(f"snr_contrastive: distance={distance!r} is not an SNR distance; use "
                     "'snr' (or dict(name='snr', ...)), or the 'contrastive' loss.")
  return contrastive(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                     ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                     pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
                     reduction=reduction, mined=mined)
