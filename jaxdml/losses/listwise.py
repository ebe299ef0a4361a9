"""Losses over each anchor's whole list of candidates: Angular, NCA, Ranked
List and Instance loss, as pytorch-metric-learning 2.9.0's `AngularLoss`,
`NCALoss`, `RankedListLoss` and `InstanceLoss` with their default reducers
and distances, value and gradient.

Angular and NCA pair anchors with a reference set as PML's `ref_emb` does
(`ref_valid`, `ref_self_index` as everywhere in jaxdml.losses); Ranked List
and Instance are in-batch only, as in PML. Where PML's code departs from the
paper, PML is followed and the docstring says so.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers
from jaxdml.losses.softmax_pairs import masked_logsumexp

_HIGHEST = jax.lax.Precision.HIGHEST
Array = jax.Array
LossAndAux = reducers.LossAndAux


def _matmul_t(x, y):
  return jnp.matmul(x, y.T, precision=_HIGHEST)


def angular(*, embeddings: Array, labels: Array, ref_embeddings: Array | None = None,
            ref_labels: Array | None = None, ref_valid: Array | None = None,
            ref_self_index: Array | None = None, alpha: float = 40.0,
            mined: miners.Mined | None = None, anchor_chunk: int = 32,
            reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Angular loss (Wang et al. 2017, "Deep Metric Learning with Angular
  Loss"; PML's `AngularLoss()`), `alpha` in degrees.

  For each positive pair (a, p), with t = tan^2(alpha):
    log(1 + sum over a's negatives n of
        exp(4 t (x_a + x_p) . x_n - 2 (1 + t) x_a . x_p)),
  averaged over the positive pairs (PML's MeanReducer). x_a and x_p are
  L2-normalised; x_n is NOT: PML normalises the pair but multiplies by the
  raw reference rows, and this follows PML (the paper assumes unit rows).
  The loss is 0 when there is no positive or no negative pair.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set (PML's `ref_emb`); see the `jaxdml.losses` docstring.
    alpha: the angle bound, in degrees (PML's default 40).
    mined: a miner's selection (jaxdml.losses.miners): its positive pairs,
      each counted as often as mined. As in PML, every negative of the
      anchor still enters the sum; the mined negatives only decide whether
      there are any.
    anchor_chunk: anchors per step of the [chunk, R, R] (positive x
      negative) computation, beside one [R, R] matrix; not PML's, it bounds
      memory only (PML builds [positive pairs, R]).
    reduction: any of jaxdml.losses.reducers (PML's reducer of that name),
      over the per-element losses PML lists (kind pos_pair);
      default PML's.

  Returns:
    (loss, aux) with aux `num_pos_pairs`.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="angular")
  pos, mined_neg, pos_w, _ = miners.restrict(p, mined)
  sq_tan = math.tan(math.radians(alpha)) ** 2
  unit_query, unit_ref = distances.l2_normalize(p.query), distances.l2_normalize(p.ref)
  anchor_neg = 4.0 * sq_tan * _matmul_t(unit_query, p.ref)  # [B, R]
  pos_neg = 4.0 * sq_tan * _matmul_t(unit_ref, p.ref)  # [R, R]: candidate p . candidate n
  anchor_pos = 2.0 * (1.0 + sq_tan) * _matmul_t(unit_query, unit_ref)  # [B, R]

  def per_anchor(args):  # [R] losses of anchor a with every candidate as its positive
    a_neg, neg_row, a_pos = args
    logits = a_neg[None, :] + pos_neg  # [p, n]
    mask = jnp.broadcast_to(neg_row[None, :], logits.shape)
    return jax.nn.softplus(masked_logsumexp(logits, mask) - a_pos)

  # Checkpointed: the backward pass recomputes each chunk's [chunk, R, R]
  # instead of keeping all B of them.
  losses = jax.lax.map(jax.checkpoint(per_anchor), (anchor_neg, p.neg, anchor_pos),
                       batch_size=min(anchor_chunk, p.query.shape[0]))
  value, _ = reducers.finish(
      {"loss": reducers.Term(losses, "pos_pair", mask=pos, weight=pos_w)}, reduction,
      labels=labels, loss_name="angular", zero=~(jnp.any(pos) & jnp.any(mined_neg)))
  return value, {"num_pos_pairs": jnp.sum(pos_w)}


def nca(*, embeddings: Array, labels: Array, ref_embeddings: Array | None = None,
        ref_labels: Array | None = None, ref_valid: Array | None = None,
        ref_self_index: Array | None = None, softmax_scale: float = 1.0,
        distance: distances.DistanceLike = "squared_euclidean",
        reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Neighbourhood Components Analysis (Goldberger et al. 2004; PML's
  `NCALoss()`).

  Per anchor i: -log of the probability mass its own class gets in
  softmax_j(-softmax_scale * d(i, j)) over the candidates j (never i
  itself), averaged over the anchors with a positive. The default distance
  is PML's `LpDistance(power=2)`: squared euclidean between L2-normalised
  rows. A similarity (`distance="cosine"`) enters the softmax unnegated,
  as in PML.

  Differences from PML, both where PML's value is degenerate: PML drops an
  anchor whose class probability underflows to exactly 0 (here only anchors
  without a positive are dropped, so the loss stays finite and large), and
  returns NaN when no anchor has a positive (here 0). PML weighs anchors by
  how often a miner's tuple names them; no `mined=` here.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set (PML's `ref_emb`); see the `jaxdml.losses` docstring.
    softmax_scale: multiplies the (negated) distances before the softmax.
    distance: a distance (jaxdml.losses.distances).
    reduction: any of jaxdml.losses.reducers (PML's reducer of that name),
      over the per-element losses PML lists (kind element: the anchors
      with a positive);
      default PML's.

  Returns:
    (loss, aux) with aux `anchors` (how many have a positive).
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="nca")
  if p.query.shape[0] <= 1:  # PML: no loss for a batch of one
    return jnp.zeros((), p.query.dtype), {"anchors": jnp.zeros((), jnp.float32)}
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  logits = softmax_scale * (mat if distances.is_similarity(distance) else -mat)
  log_prob = masked_logsumexp(logits, p.pos) - masked_logsumexp(logits, p.pos | p.neg)
  has_pos = jnp.any(p.pos, axis=1)
  value, _ = reducers.finish(
      {"loss": reducers.Term(-jnp.where(has_pos, log_prob, 0.0), "element", mask=has_pos)},
      reduction, labels=labels, loss_name="nca")
  return value, {"anchors": pairs.count(has_pos)}


def ranked_list(*, embeddings: Array, labels: Array, margin: float, Tn: float,  # pylint: disable=invalid-name
                imbalance: float = 0.5, alpha: float | None = None, Tp: float = 0.0,
                distance: distances.DistanceLike = "euclidean", ref_embeddings: Array | None = None,
                ref_labels: Array | None = None, ref_valid: Array | None = None,
                ref_self_index: Array | None = None,
                reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Ranked List Loss (Wang et al. 2019; PML's `RankedListLoss(margin, Tn)`).

  `margin` and `Tn` are required, as in PML. With boundary alpha (default
  1 + margin / 2), per anchor i:
    L_P = sum_j w+_ij (d_ij - (alpha - margin)) / (sum_j w+_ij + 1e-5 B)
      over positives with d_ij > alpha - margin, w+ = exp(Tp (d_ij - (alpha - margin))),
    L_N = sum_j w-_ij (alpha - d_ij) / (sum_j w-_ij + 1e-5 B)
      over negatives with d_ij < alpha, w- = exp(Tn (alpha - d_ij)),
  loss_i = (1 - imbalance) L_P + imbalance L_N, averaged over the batch.

  PML's code, followed here: the 1e-5 is added once per column, so the
  denominators carry 1e-5 B; pairs at distance exactly 0 are left out
  (a duplicate row is no violating negative); the weights are not held
  constant, the gradient goes through them; and the matrix is used as is,
  so a similarity (`distance="cosine"`) gets the distance formula.
  In-batch only (PML rejects `ref_emb`); no miner (PML rejects one).

  Args:
    embeddings: float [B, D].
    labels: int [B].
    margin, Tn, imbalance, alpha, Tp: PML's names (see above).
    distance: a distance (jaxdml.losses.distances); "euclidean" is PML's
      default `LpDistance()`, which L2-normalises the rows first.
    reduction: any of jaxdml.losses.reducers (PML's reducer of that name),
      over the per-element losses PML lists (kind element, per anchor);
      default PML's.

  Returns:
    (loss, aux) with aux `pos_loss`, `neg_loss` (batch means of L_P, L_N).
  """
  pairs.reject_ref("ranked_list", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  if not 0.0 <= imbalance <= 1.0:
    raise ValueError(f"ranked_list: imbalance={imbalance} must lie in [0, 1].")
  alpha = 1.0 + margin / 2.0 if alpha is None else alpha
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None,
                    ref_labels=None, ref_valid=None, ref_self_index=None,
                    loss_name="ranked_list")
  b = p.query.shape[0]
  # Both masks leave the diagonal out, so PML's zeroing of it changes nothing.
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  boundary = alpha - margin
  pos_star = jnp.where(p.pos & (mat > boundary), mat, 0.0)
  neg_star = jnp.where(p.neg & (mat < alpha), mat, 0.0)
  # PML selects the weighted pairs by P* > 0 and N* > 0, not by the masks.
  # The inner where keeps exp finite (and its gradient not NaN) elsewhere.
  w_pos = jnp.where(pos_star > 0, jnp.exp(Tp * (jnp.where(pos_star > 0, pos_star, boundary)
                                                - boundary)), 0.0)
  w_neg = jnp.where(neg_star > 0, jnp.exp(Tn * (alpha - jnp.where(neg_star > 0, neg_star,
                                                                  alpha))), 0.0)
  pos_loss = (jnp.sum(w_pos * (pos_star - boundary), axis=1)
              / (jnp.sum(w_pos, axis=1) + 1e-5 * b))
  neg_loss = jnp.sum(w_neg * (alpha - neg_star), axis=1) / (jnp.sum(w_neg, axis=1) + 1e-5 * b)
  per_anchor = (1.0 - imbalance) * pos_loss + imbalance * neg_loss
  value, _ = reducers.finish({"loss": reducers.Term(per_anchor, "element")}, reduction,
                             labels=labels, loss_name="ranked_list")
  return value, {"pos_loss": jnp.mean(pos_loss), "neg_loss": jnp.mean(neg_loss)}


def _dense_class_ids(labels):
  """torch.unique(labels, return_inverse=True)[1]: each label's rank among
  the distinct labels, [B] int, without data-dependent shapes."""
  b = labels.shape[0]
  earlier_same = (labels[:, None] == labels[None, :]) & jnp.tri(b, k=-1, dtype=bool)
  first = ~jnp.any(earlier_same, axis=1)  # first occurrence of its label
  return jnp.sum(first[None, :] & (labels[None, :] < labels[:, None]), axis=1)


def instance(*, embeddings: Array, labels: Array, gamma: float = 64.0,
             ref_embeddings: Array | None = None, ref_labels: Array | None = None,
             ref_valid: Array | None = None, ref_self_index: Array | None = None,
             reduction: reducers.Reduction = "mean") -> LossAndAux:
  """Instance loss as PML's `InstanceLoss()` computes it (after Zheng et al.
  2020, "Dual-Path Convolutional Image-Text Embeddings with Instance Loss").

  Logits are gamma times the [B, B] cosine similarities of the batch (self
  included); each row is a softmax cross-entropy whose target is the
  row's dense class id (its label's rank among the batch's distinct
  labels), averaged over the batch.

  PML's code, followed here: the target indexes a column of the batch, so
  row i is pushed towards the sample at position k_i (k_i its dense class
  id), not towards a class; with every label distinct and sorted by
  position this is the paper's instance classification. In-batch only,
  no miner, as in PML.

  Args:
    embeddings: float [B, D].
    labels: int [B].
    gamma: the logit scale.
    reduction: any of jaxdml.losses.reducers (PML's reducer of that name),
      over the per-element losses PML lists (kind element, per row);
      default PML's.

  Returns:
    (loss, aux) with aux `self_similarity_prob` (mean softmax mass on the
    diagonal).
  """
  pairs.reject_ref("instance", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None,
                    ref_labels=None, ref_valid=None, ref_self_index=None,
                    loss_name="instance")
  logits = gamma * distances.cosine_matrix(p.query, p.query)
  log_prob = jax.nn.log_softmax(logits, axis=1)
  target = _dense_class_ids(jnp.asarray(labels))
  losses = -jnp.take_along_axis(log_prob, target[:, None], axis=1)[:, 0]
  value, _ = reducers.finish({"loss": reducers.Term(losses, "element")}, reduction,
                             labels=labels, loss_name="instance")
  return value, {"self_similarity_prob": jnp.mean(jnp.exp(jnp.diagonal(log_prob)))}
