"""Relative Triplet Loss (RTL) for sketch-based image retrieval.

PAPERS.md section 1 (Seddati et al. 2023); the paper's exact equation is not
public, so this is our formulation. Anchors are sketches (`embeddings`);
positives and negatives are photos (`ref_embeddings`) or, without a reference
set, the batch itself. Sketchy holds near-identical sketches of different
photos, and a plain triplet loss punishes the model for embedding them close.
RTL scales the hinge of triplet (a_i, p, n) by how different a_i is from the
sketches *of the negative's photo*:

  w(i, n) = stop_gradient(1 - max(0, cos(a_i, c_n)))

with c_n the mean of the batch anchors whose label equals label(n) (with one
sketch per photo, exactly that sketch) and w = 1 when no anchor has that
label. Choices that are ours where the paper is silent:
- the weight depends on (anchor, negative), not on the positive;
- weights are normalised to mean 1 over the triplets the reduction averages
  over (the active ones for "avg_nonzero", all mined ones for "mean"), so the
  loss is the w-weighted mean hinge and keeps the scale of the plain loss;
- c_n averages raw anchors (before any normalisation) and mining picks
  triplets by distance alone, unweighted.
`weighting="none"` is exactly `triplet` with the same mining (the ablation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import pairs
from jaxdml.losses import reducers
from jaxdml.losses import triplet as triplet_lib

WEIGHTINGS = ("anchor_dissimilarity", "none")


def anchor_dissimilarity_weights(anchors: jax.Array, anchor_labels: jax.Array,
                                 candidate_labels: jax.Array) -> jax.Array:
  """[B, R] weights 1 - max(0, cos(a_i, c_n)), 1 where label(n) has no anchor.

  `anchors` float [B, D], `anchor_labels` int [B], `candidate_labels` int [R]; float [B, R].
  """
  same = candidate_labels[:, None] == anchor_labels[None, :]  # [R, B]
  counts = jnp.sum(same, axis=1)
  centres = jnp.matmul(same.astype(anchors.dtype), anchors,
                       precision=jax.lax.Precision.HIGHEST)
  centres = centres / jnp.maximum(counts, 1)[:, None].astype(anchors.dtype)
  cos = distances.cosine_matrix(anchors, centres)
  w = jnp.where(counts[None, :] > 0, 1.0 - jnp.maximum(cos, 0.0), 1.0)
  return jax.lax.stop_gradient(w)


def relative_triplet(*, embeddings: jax.Array, labels: jax.Array,
                     ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                     ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                     margin: float = 0.05, distance: distances.DistanceLike = "euclidean",
                     mining: str = "all", weighting: str = "anchor_dissimilarity",
                     reduction: reducers.Reduction = "avg_nonzero") -> reducers.LossAndAux:
  """Relative Triplet Loss; arguments as `triplet` plus `weighting`.

  Args:
    embeddings: float [B, D] anchors (sketches).
    labels: int [B] (the photo instance id of each sketch).
    ref_embeddings, ref_labels, ref_valid, ref_self_index: the photos; see
      the `jaxdml.losses` docstring. Without them the batch is the candidate
      set.
    margin, distance, mining, reduction: as `triplet`.
    weighting: "anchor_dissimilarity" (RTL) | "none" (plain triplet).

  Returns:
    (loss, aux): aux as `triplet` plus `mean_weight`, the mean raw weight
    over the reduced triplets (1 for "none").
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(
        f"weighting={weighting!r} is not supported; use one of {WEIGHTINGS}.")
  p = pairs.prepare(embeddings=embeddings, labels=labels,
                    ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                    ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="relative_triplet")
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  dis = distances.dissimilarity(mat, distance=distance)
  if weighting == "none":
    weight = jnp.ones_like(dis)
  else:
    labels = jnp.asarray(labels)
    cand_labels = labels if ref_labels is None else jnp.asarray(ref_labels)
    weight = anchor_dissimilarity_weights(p.query, labels, cand_labels)
  pairs.check_reduction(reduction)
  loss, aux, den = triplet_lib.weighted_triplet(
      dis=dis, pos=p.pos, neg=p.neg, weight=weight, margin=margin,
      mining=mining, reduction=reduction)
  n_reduced = (aux["num_active"] if reduction == "avg_nonzero"
               else aux["num_triplets"])
  aux["mean_weight"] = (den / jnp.maximum(n_reduced, 1.0)).astype(jnp.float32)
  return loss, aux
