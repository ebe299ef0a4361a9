"""Multi-Similarity loss and miner (Wang et al. 2019), as pytorch-metric-learning.

Per anchor i, with s the (cosine) similarity:
  (1/alpha) log(1 + sum_pos exp(-alpha (s - base)))
  + (1/beta) log(1 + sum_neg exp(beta (s - base)))
averaged over all anchors (PML's MeanReducer for this loss; anchors without
pairs contribute 0 and still count).

`miner_epsilon` set = PML `MultiSimilarityMiner(epsilon)`: a positive is kept
when s_ap - eps < max_neg s_an, a negative when s_an + eps > min_pos s_ap, per
anchor; when the whole batch has no positive pair or no negative pair the
miner returns nothing and the loss is 0. Like PML's GenericPairLoss the loss
is also 0 when at most one positive and one negative pair remain. Other
distances follow PML's `distance.margin` sign convention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def _log1p_sum_exp(x, mask):
  """log(1 + sum_{mask} exp(x)) per row, stable, 0 for empty rows."""
  x = jnp.where(mask, x, -jnp.inf)
  x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  return jax.nn.logsumexp(x, axis=1)


def multi_similarity(*, embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                     ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                     alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     miner_epsilon: float | None = None,
                     distance: distances.DistanceLike = "cosine",
                     reduction: reducers.Reduction = "mean",
                     mined: miners.Mined | None = None) -> reducers.LossAndAux:
  """Multi-Similarity loss; defaults are PML's `MultiSimilarityLoss()`.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set; see the `jaxdml.losses` docstring.
    alpha, beta, base: PML's names (positive scale, negative scale, the
      similarity offset lambda of the paper).
    miner_epsilon: None (all pairs) or the MS miner's epsilon.
    distance: a distance (jaxdml.losses.distances); "cosine" as PML's default.
    reduction: "mean" over anchors (PML default) or any reducer of
      jaxdml.losses.reducers, over the anchors' ("element") losses.
    mined: a miner's selection (jaxdml.losses.miners), used as a set as
      PML's masks do; `miner_epsilon` then mines within it.

  Returns:
    (loss, aux) with aux `num_pos_pairs`, `num_neg_pairs` (after mining),
    `pos_loss`, `neg_loss` (anchor means of the two terms).
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels,
                    ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                    ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="multi_similarity")
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  pos, neg, _, _ = miners.restrict(p, mined)
  if miner_epsilon is not None:
    pos, neg = miners.multi_similarity_select(distances.dissimilarity(mat, distance=distance),
                                              pos, neg, miner_epsilon)
  sim = distances.is_similarity(distance)
  pos_exp = base - mat if sim else mat - base
  neg_exp = mat - base if sim else base - mat
  pos_term = _log1p_sum_exp(alpha * pos_exp, pos) / alpha
  neg_term = _log1p_sum_exp(beta * neg_exp, neg) / beta
  n_pos, n_neg = pairs.count(pos), pairs.count(neg)
  per_anchor = pos_term + neg_term
  loss, _ = reducers.finish({"loss": reducers.Term(per_anchor, "element")}, reduction,
                            labels=labels, loss_name="multi_similarity",
                            zero=(n_pos <= 1) & (n_neg <= 1))
  aux = {
      "num_pos_pairs": n_pos,
      "num_neg_pairs": n_neg,
      "pos_loss": jnp.mean(pos_term),
      "neg_loss": jnp.mean(neg_term),
  }
  return loss, aux
