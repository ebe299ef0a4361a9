"""Losses on the distribution of pair similarities: Histogram loss, PNP,
Intra-pair variance and the Threshold-consistent margin loss, as
pytorch-metric-learning 2.9.0's `HistogramLoss`, `PNPLoss`,
`IntraPairVarianceLoss` and `ThresholdConsistentMarginLoss` with their
default reducers and (cosine) similarity, value and gradient.

Intra-pair variance and TCM pair anchors with a reference set (`ref_*` as
everywhere in jaxdml.losses); Histogram and PNP are in-batch only, as in
PML. Where PML's code departs from the paper, PML is followed and the
docstring says so.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers
from jaxdml.losses import miners
from jaxdml.losses import pairs

PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")
Array = jax.Array
LossAndAux = reducers.LossAndAux


def _histogram_nodes(n_bins, delta):
  """PML's rule: delta = 2 / n_bins, 100 bins when neither is given."""
  if n_bins is not None and delta is not None and delta != 2 / n_bins:
    raise ValueError(f"histogram: delta={delta} and n_bins={n_bins} disagree; they must "
                     "satisfy delta = 2 / n_bins (pass only one).")
  if n_bins is None and delta is None:
    n_bins = 100
  delta = 2 / n_bins if delta is None else delta
  if not delta > 0:
    raise ValueError(f"histogram: delta={delta} must be > 0.")
  return float(delta), round(1 + 2 / delta)


def _density(sims, mask, delta, nodes):
  """Linear-interpolation histogram of the similarities where `mask` holds,
  on the nodes -1, -1 + delta, ..., 1 (PML's `compute_density`), [nodes]."""
  # PML finds the bin in float32 whatever the input dtype.
  lower = jnp.floor((sims.astype(jnp.float32) + 1) / delta).astype(jnp.int32)
  to_upper = (sims + 1 - lower * delta) / delta
  to_lower = ((lower + 1) * delta - 1 - sims) / delta

  def into(idx, weight):  # a value outside [-1, 1] has no node; PML would fail there
    idx = jnp.where(mask & (idx >= 0) & (idx < nodes), idx, nodes)
    return jnp.zeros(nodes, sims.dtype).at[idx.ravel()].add(
        jnp.where(mask, weight, 0.0).ravel(), mode="drop")
  size = jnp.maximum(jnp.sum(mask), 1).astype(sims.dtype)
  return (into(lower + 1, to_upper) + into(lower, to_lower)) / size


def _unordered(pair_mask):
  """Each unordered {i, j} once (i < j) for a symmetric-in-meaning [B, B] mask."""
  both = pair_mask | pair_mask.T
  return both & jnp.triu(jnp.ones(both.shape, bool), k=1)


def histogram(*, embeddings: Array, labels: Array, n_bins: int | None = None,
              delta: float | None = None, mined: miners.Mined | None = None,
              ref_embeddings: Array | None = None, ref_labels: Array | None = None,
              ref_valid: Array | None = None, ref_self_index: Array | None = None,
              reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Histogram loss (Ustinova & Lempitsky 2016; PML's `HistogramLoss()`).
  PML computes it already reduced: `reduction` stays "mean".

  The cosine similarities of the positive and of the negative pairs are
  binned into linear-interpolation histograms p+ and p- on [-1, 1]
  (`n_bins` bins of width `delta` = 2 / n_bins, 100 by default); the loss
  is sum_r p-_r Phi+_r with Phi+ the cumulative p+: the probability that a
  negative pair is more similar than a positive one.

  As PML: the pairs are those of the triplets (all of them, or a miner's),
  each unordered pair {i, j} once, so a positive pair counts only when
  one of its ends has a negative (and vice versa); the loss is 0 without a
  triplet. A similarity of exactly 1 (a duplicate row) goes wholly into the
  last node, where PML's scatter would index past its histogram and fail.
  In-batch only, as in PML.

  Args:
    embeddings: float [B, D].
    labels: int [B].
    n_bins, delta: the binning; give either (PML checks they agree).
    mined: a miner's selection (jaxdml.losses.miners): the pairs of its
      triplets, as PML's `convert_to_triplets`.

  Returns:
    (loss, aux) with aux `num_pos_pairs`, `num_neg_pairs` (unordered).
  """
  reducers.check_reducible(reduction, "mean", "histogram")
  pairs.reject_ref("histogram", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  delta, nodes = _histogram_nodes(n_bins, delta)
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None,
                    ref_labels=None, ref_valid=None, ref_self_index=None,
                    loss_name="histogram")
  if mined is None:  # every (a, p, n): a positive pair needs a negative of its anchor
    in_pos = p.pos & jnp.any(p.neg, axis=1, keepdims=True)
    in_neg = p.neg & jnp.any(p.pos, axis=1, keepdims=True)
  else:
    miners.restrict(p, mined)  # checks the shapes
    in_pos, in_neg = p.pos & (mined.tpos > 0), p.neg & (mined.tneg > 0)
  pos_pairs, neg_pairs = _unordered(in_pos), _unordered(in_neg)
  sims = distances.cosine_matrix(p.query, p.query)
  phi = jnp.cumsum(_density(sims, pos_pairs, delta, nodes))
  value = jnp.sum(_density(sims, neg_pairs, delta, nodes) * phi)
  value = jnp.where(jnp.any(in_pos), value, 0.0)
  return value, {"num_pos_pairs": pairs.count(pos_pairs), "num_neg_pairs": pairs.count(neg_pairs)}


def _clamped_sigmoid(x, temperature):
  """PML's PNP sigmoid: exp's argument clamped to [-50, 50] (no gradient
  past the clamp)."""
  return 1.0 / (1.0 + jnp.exp(jnp.clip(-x / temperature, -50.0, 50.0)))


def pnp(*, embeddings: Array, labels: Array, b: float = 2.0, alpha: float = 1.0,
        anneal: float = 0.01, variant: str = "O", anchor_chunk: int = 32,
        ref_embeddings: Array | None = None, ref_labels: Array | None = None,
        ref_valid: Array | None = None, ref_self_index: Array | None = None,
        reduction: reducers.Reduction = "mean") -> LossAndAux:
  """PNP loss (Li et al. 2022, "Rethinking the Optimization of Average
  Precision: Only Penalizing Negative Instances before Positive Ones is
  Enough"; PML's `PNPLoss()`).

  For query i and each j of its class (i itself included, as PML's code
  does), R_ij = sum over i's negatives k of sigmoid((s_ik - s_ij) / anneal),
  the soft count of negatives ranked above j (cosine s). The variant maps
  R: "O" R, "Ds" log(1 + R), "Dq" 1 / (1 + R)^alpha, "Iu" (1 + R) log(1 + R),
  "Ib" (b R - log(1 + b R)) / b^2. The loss is the mean over queries with a
  positive of the mean over their j of the mapped R ("Dq": 1 minus it).
  In-batch only, no miner, as in PML.

  Args:
    embeddings: float [B, D].
    labels: int [B].
    b, alpha, anneal, variant: PML's names: the "Ib" and "Dq" shapes, the
      sigmoid's temperature, the mapping of R.
    anchor_chunk: queries per step of the [chunk, B, B] computation (PML
      builds [B, B, B] at once); not PML's, it bounds memory only.

  Returns:
    (loss, aux) with aux `anchors` (queries with a positive).
  """
  reducers.check_reducible(reduction, "mean", "pnp")
  pairs.reject_ref("pnp", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  if variant not in PNP_VARIANTS:
    raise ValueError(f"pnp: variant={variant!r}; use one of {PNP_VARIANTS}.")
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None,
                    ref_labels=None, ref_valid=None, ref_self_index=None, loss_name="pnp")
  sims = distances.cosine_matrix(p.query, p.query)
  has_pos = jnp.any(p.pos, axis=1)
  # PML counts the query itself among its positives when it has another one.
  relevant = p.pos | (jnp.eye(sims.shape[0], dtype=bool) & has_pos[:, None])
  neg_f = p.neg.astype(sims.dtype)

  def negatives_before(args):  # [B]: R_ij for query i and every j
    s, neg = args
    return jnp.sum(_clamped_sigmoid(s[None, :] - s[:, None], anneal) * neg[None, :], axis=1)
  rank = jax.lax.map(jax.checkpoint(negatives_before), (sims, neg_f),
                     batch_size=min(anchor_chunk, sims.shape[0]))
  mapped = {
      "O": lambda r: r,
      "Ds": jnp.log1p,
      "Dq": lambda r: 1.0 / (1.0 + r) ** alpha,
      "Iu": lambda r: (1.0 + r) * jnp.log1p(r),
      "Ib": lambda r: (b * r - jnp.log1p(b * r)) / b ** 2,
  }[variant](rank)
  per_query = (jnp.sum(jnp.where(relevant, mapped, 0.0), axis=1)
               / jnp.maximum(jnp.sum(relevant, axis=1), 1))
  value = pairs.reduce(per_query, has_pos, "mean")
  if variant == "Dq":
    value = 1.0 - value
  value = jnp.where(jnp.any(has_pos), value, 0.0)
  return value, {"anchors": pairs.count(has_pos)}


def intra_pair_variance(*, embeddings: Array, labels: Array,
                        ref_embeddings: Array | None = None, ref_labels: Array | None = None,
                        ref_valid: Array | None = None, ref_self_index: Array | None = None,
                        pos_eps: float = 0.01, neg_eps: float = 0.01,
                        distance: distances.DistanceLike = "cosine",
                        mined: miners.Mined | None = None,
                        reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Intra-pair variance loss (Yu & Tao 2019, "Deep Metric Learning with
  Tuplet Margin Loss"; PML's `IntraPairVarianceLoss()`).

  With mu+ and mu- the mean similarity of the positive and of the negative
  pairs (gradient flowing through the means, as PML):
    mean over positives of [(1 - pos_eps) mu+ - s]_+^2
    + mean over negatives of [s - (1 + neg_eps) mu-]_+^2.
  For a distance d (not a similarity) the roles flip as in PML:
  [d - (1 + pos_eps) mu+]_+^2 and [(1 - neg_eps) mu- - d]_+^2. Each part is
  0 without pairs; the loss is 0 with at most one positive and one
  negative pair (PML's pair-loss rule).

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set (PML's `ref_emb`); see the `jaxdml.losses` docstring.
    pos_eps, neg_eps: the slack around each mean.
    distance: a distance (jaxdml.losses.distances); "cosine" as PML's default.
    mined: a miner's selection (jaxdml.losses.miners); each pair counts as
      often as mined, in the means too, as in PML's pair lists.
    reduction: any of jaxdml.losses.reducers, applied to "pos_loss"
      (pos_pair) and "neg_loss" (neg_pair) and summed; PML's MeanReducer.

  Returns:
    (loss, aux) with aux `pos_loss`, `neg_loss`, `num_pos_pairs`, `num_neg_pairs`.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="intra_pair_variance")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  n_pos, n_neg = jnp.sum(pos_w), jnp.sum(neg_w)
  mean_pos = jnp.sum(pos_w * mat) / jnp.maximum(n_pos, 1.0)
  mean_neg = jnp.sum(neg_w * mat) / jnp.maximum(n_neg, 1.0)
  if distances.is_similarity(distance):
    pos_gap, neg_gap = (1.0 - pos_eps) * mean_pos - mat, mat - (1.0 + neg_eps) * mean_neg
  else:
    pos_gap, neg_gap = mat - (1.0 + pos_eps) * mean_pos, (1.0 - neg_eps) * mean_neg - mat
  value, parts = reducers.finish(
      {"pos_loss": reducers.Term(jnp.square(jax.nn.relu(pos_gap)), "pos_pair", mask=pos,
                                 weight=pos_w),
       "neg_loss": reducers.Term(jnp.square(jax.nn.relu(neg_gap)), "neg_pair", mask=neg,
                                 weight=neg_w)},
      reduction, labels=labels, loss_name="intra_pair_variance",
      zero=(n_pos <= 1) & (n_neg <= 1))
  pos_loss, neg_loss = parts.get("pos_loss", 0.0), parts.get("neg_loss", 0.0)
  return value, {"pos_loss": pos_loss, "neg_loss": neg_loss, "num_pos_pairs": n_pos,
                 "num_neg_pairs": n_neg}


def threshold_consistent_margin(*, embeddings: Array, labels: Array,
                                ref_embeddings: Array | None = None,
                                ref_labels: Array | None = None,
                                ref_valid: Array | None = None,
                                ref_self_index: Array | None = None, lambda_plus: float = 1.0,
                                lambda_minus: float = 1.0, margin_plus: float = 0.9,
                                margin_minus: float = 0.5,
                                mined: miners.Mined | None = None,
                                reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Threshold-consistent margin loss (Zhang et al. 2023, "Threshold-Consistent
  Margin Loss for Open-World Deep Metric Learning"; PML's
  `ThresholdConsistentMarginLoss()`).

  With cosine similarities s:
    lambda_plus * mean over positives with s <= margin_plus of (margin_plus - s)
    + lambda_minus * mean over negatives with s >= margin_minus of (s - margin_minus),
  each mean 0 when no pair qualifies.

  Against a reference set the pairs are (anchor, reference row), as PML's
  pair losses form them. PML's own `ref_emb` path looks the reference
  indices up in the batch instead (a bug), so it is not followed there:
  with a reference set this is PML's `ContrastiveLoss(margin_plus,
  margin_minus, CosineSimilarity())`'s two parts weighted by the lambdas.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set; see the `jaxdml.losses` docstring.
    lambda_plus, lambda_minus, margin_plus, margin_minus: PML's names.
    mined: a miner's selection (jaxdml.losses.miners); each pair counts as
      often as mined, as in PML's pair lists.

  Returns:
    (loss, aux) with aux `pos_loss`, `neg_loss` (the two means) and
    `active_pos_pairs`, `active_neg_pairs`.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="threshold_consistent_margin")
  reducers.check_reducible(reduction, "mean", "threshold_consistent_margin")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  s = distances.cosine_matrix(p.query, p.ref)
  pos_w = jnp.where(pos & (s <= margin_plus), pos_w, 0.0)
  neg_w = jnp.where(neg & (s >= margin_minus), neg_w, 0.0)
  n_pos, n_neg = jnp.sum(pos_w), jnp.sum(neg_w)
  pos_loss = jnp.sum(pos_w * (margin_plus - s)) / jnp.maximum(n_pos, 1.0)
  neg_loss = jnp.sum(neg_w * (s - margin_minus)) / jnp.maximum(n_neg, 1.0)
  value = lambda_plus * pos_loss + lambda_minus * neg_loss
  return value, {"pos_loss": pos_loss, "neg_loss": neg_loss, "active_pos_pairs": n_pos,
                 "active_neg_pairs": n_neg}
