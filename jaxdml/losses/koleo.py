"""KoLeo differential-entropy regulariser and IRT's contrastive + KoLeo loss.

KoLeo (Sablayrolles et al. 2019, used by IRT and DINOv2) spreads a batch out:
  -mean_i log(min_{j != i} ||z_i - z_j|| + eps),  z = L2-normalised embeddings.
As DINOv2's `KoLeoLoss`, the nearest neighbour is found by the largest dot
product (index under stop_gradient) and the distance is then recomputed so
its gradient flows to both points. Our choice: DINOv2 adds eps inside the
pairwise distance; we use a safe norm instead, so exact duplicates get a zero
(finite) gradient rather than one along an arbitrary (1, ..., 1) direction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import contrastive as contrastive_lib
from jaxdml.losses import distances
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def koleo_term(embeddings: jax.Array, eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """The KoLeo value and the mean nearest-neighbour distance of a [B, D] batch.

  `embeddings` float [B, D]; both values are float32 scalars.
  """
  z = distances.l2_normalize(distances.as_float(embeddings))
  b = z.shape[0]
  dots = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
  dots = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, dots)
  nn = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))
  dist = distances.safe_norm(z - z[nn])
  return -jnp.mean(jnp.log(dist + eps)), jnp.mean(dist)


def _check_batch(embeddings, loss_name):
  if embeddings.ndim != 2 or embeddings.shape[0] < 2:
    raise ValueError(
        f"{loss_name}: needs embeddings [B, D] with B >= 2 (a nearest"
        f" neighbour), got shape {embeddings.shape}.")


def koleo(*, embeddings: jax.Array, labels: jax.Array | None = None,
          ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
          ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
          eps: float = 1e-8) -> reducers.LossAndAux:
  """KoLeo regulariser on the batch; `labels` are accepted and unused.

  Shapes: `embeddings` float [B, D] (B >= 2); the loss is a float32 scalar.

  Returns:
    (loss, aux) with aux `mean_nn_distance`.
  """
  del labels
  pairs.reject_ref("koleo", ref_embeddings=ref_embeddings,
                   ref_labels=ref_labels, ref_valid=ref_valid,
                   ref_self_index=ref_self_index)
  embeddings = jnp.asarray(embeddings)
  _check_batch(embeddings, "koleo")
  loss, nn_dist = koleo_term(embeddings, eps)
  return loss, {"mean_nn_distance": nn_dist}


def contrastive_koleo(*, embeddings: jax.Array, labels: jax.Array,
                      ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                      ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                      pos_margin: float = 1.0, neg_margin: float = 0.5,
                      distance: distances.DistanceLike = "cosine",
                      reduction: reducers.Reduction = "avg_nonzero", koleo_weight: float = 0.7,
                      koleo_eps: float = 1e-8) -> reducers.LossAndAux:
  """IRT's loss: `contrastive` + koleo_weight * KoLeo(batch).

  Defaults are IRT's (PAPERS.md section 5: cosine, 1 - s on positives,
  [s - 0.5]_+ on negatives, KoLeo weight 0.7). The contrastive part uses the
  reference set when given (cross-batch memory); KoLeo sees the batch
  embeddings only.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.

  Returns:
    (loss, aux): the contrastive aux plus `contrastive` and `koleo` (the
    unweighted terms) and `mean_nn_distance`.
  """
  embeddings = jnp.asarray(embeddings)
  _check_batch(embeddings, "contrastive_koleo")
  c_loss, aux = contrastive_lib.contrastive(
      embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
      ref_labels=ref_labels, ref_valid=ref_valid,
      ref_self_index=ref_self_index, pos_margin=pos_margin,
      neg_margin=neg_margin, distance=distance, reduction=reduction)
  k_loss, nn_dist = koleo_term(embeddings, koleo_eps)
  aux = dict(aux, contrastive=c_loss, koleo=k_loss, mean_nn_distance=nn_dist)
  return c_loss + koleo_weight * k_loss, aux
