"""Lifted structure losses (Oh Song et al. 2016; Hermans et al. 2017).

Equal to pytorch-metric-learning 2.9.0's `LiftedStructureLoss` and
`GeneralizedLiftedStructureLoss` with their default reducers and distance
(`distance=`, jaxdml.losses.distances: "euclidean" is PML's `LpDistance()`,
which L2-normalises the rows first). Both allocate [B, R] and nothing
larger.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers
from jaxdml.losses.softmax_pairs import masked_logsumexp


def lifted_structure(*, embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                     ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                     pos_margin: float = 0.0, neg_margin: float = 1.0,
                     distance: distances.DistanceLike = "euclidean",
                     mined: miners.Mined | None = None,
                     reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Each positive pair (i, j): [logsumexp over the negatives of i and of j
  of (neg_margin - d) + d_ij - pos_margin]_+^2 / 2, averaged over positive
  pairs (both orders, as PML). In-batch only: the negatives of j need j's
  row. `mined`: a miner's pairs, each counted as often as mined.
  `reduction`: any of jaxdml.losses.reducers over these pos_pair losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  pairs.reject_ref("lifted_structure", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None,
                    ref_labels=None, ref_valid=None, ref_self_index=None,
                    loss_name="lifted_structure")
  pos, neg, pos_w, neg_w = miners.restrict(p, mined)
  d = distances.dissimilarity(distances.pairwise(p.query, p.ref, distance=distance),
                              distance=distance)
  per_row = masked_logsumexp(neg_margin - d, neg, weight=neg_w)  # [B]
  negatives = jnp.logaddexp(per_row[:, None], per_row[None, :])
  inner = negatives + d - pos_margin
  losses = jnp.square(jax.nn.relu(jnp.where(pos, inner, 0.0))) / 2.0
  value, _ = reducers.finish(
      {"loss": reducers.Term(losses, "pos_pair", mask=pos, weight=pos_w)}, reduction,
      labels=labels, loss_name="lifted_structure", zero=~(jnp.any(pos) & jnp.any(neg)))
  return value, {}


def generalized_lifted_structure(*, embeddings: jax.Array, labels: jax.Array,
                                 ref_embeddings: jax.Array | None = None,
                                 ref_labels: jax.Array | None = None,
                                 ref_valid: jax.Array | None = None,
                                 ref_self_index: jax.Array | None = None, pos_margin: float = 0.0,
                                 neg_margin: float = 1.0,
                                 distance: distances.DistanceLike = "euclidean",
                                 mined: miners.Mined | None = None,
                                 reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Per anchor: [logsumexp_p (d_p - pos_margin) + logsumexp_n (neg_margin
  - d_n)]_+, a missing side counting 0; averaged over anchors. `mined`: a
  miner's pairs, as a set. `reduction`: any of jaxdml.losses.reducers over
  the anchors' ("element") losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="generalized_lifted_structure")
  pos_mask, neg_mask, _, _ = miners.restrict(p, mined)
  d = distances.dissimilarity(distances.pairwise(p.query, p.ref, distance=distance),
                              distance=distance)
  zero_if_none = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)
  pos = zero_if_none(masked_logsumexp(d - pos_margin, pos_mask))
  neg = zero_if_none(masked_logsumexp(neg_margin - d, neg_mask))
  value, _ = reducers.finish({"loss": reducers.Term(jax.nn.relu(pos + neg), "element")},
                             reduction, labels=labels, loss_name="generalized_lifted_structure")
  return value, {}
