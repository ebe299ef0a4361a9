"""Margin loss and N-pairs, equal to pytorch-metric-learning 2.9.0's
`MarginLoss` (all or mined triplets, fixed or learned beta) and `NPairsLoss`."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def margin(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
           ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
           ref_self_index: jax.Array | None = None,
           margin: float = 0.2,  # pylint: disable=redefined-outer-name
           beta: float = 1.2, distance: distances.DistanceLike = "euclidean",
           mined: miners.Mined | None = None, learn_beta: bool = False, nu: float = 0.0,
           beta_per_class: bool = False, loss_params: Mapping[str, jax.Array] | None = None,
           reduction: reducers.Reduction = "divisor") -> reducers.LossAndAux:
  """Margin loss (Wu et al. 2017), PML's `MarginLoss()`: over every triplet
  (a, p, n), or a miner's (`mined=`), [d_ap - beta + margin]_+ +
  [beta - d_an + margin]_+, summed and divided by the number of non-zero
  terms.

  The terms separate, so the sum is each pair's term times the number of
  triplets that hold the pair: [B, R] where PML builds every triplet.
  `distance` as in jaxdml.losses.distances ("euclidean", PML's default
  `LpDistance()`, L2-normalises the rows first). With `learn_beta` beta is a learned parameter,
  `loss_params["beta"]` ([1], or [num_classes] with `beta_per_class`,
  PML's `num_classes=`), initialised to `beta`, plus PML's regulariser
  nu * beta (per class: summed over the triplets' anchors, divided as the
  loss).

  `reduction`: PML's DivisorReducer by default (computed from pair counts);
  any other reducer of jaxdml.losses.reducers reduces PML's per-triplet
  losses ("margin_loss", kind triplet, from the dense [B, R, R] tensor) and
  its "beta_reg_loss", and needs `mined=None`.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="margin")
  d = distances.dissimilarity(distances.pairwise(p.query, p.ref, distance=distance),
                              distance=distance)
  if mined is None:  # all triplets: per anchor, |N_a| per positive, |P_a| per negative
    t_pos = p.pos * jnp.sum(p.neg, 1, keepdims=True)
    t_neg = p.neg * jnp.sum(p.pos, 1, keepdims=True)
  else:
    miners.restrict(p, mined)  # checks the shapes
    t_pos, t_neg = jnp.where(p.pos, mined.tpos, 0.0), jnp.where(p.neg, mined.tneg, 0.0)
  if learn_beta:
    table = loss_params["beta"]
    beta = (table[jnp.asarray(labels)] if beta_per_class else table[:1])[:, None]
  pos = jax.nn.relu(d - beta + margin)
  neg = jax.nn.relu(beta - d + margin)
  total = jnp.sum(t_pos * pos) + jnp.sum(t_neg * neg)
  divisor = jnp.sum(jnp.where(pos > 0, t_pos, 0.0)) + jnp.sum(jnp.where(neg > 0, t_neg, 0.0))
  value = jnp.where(divisor > 0, total / jnp.where(divisor > 0, divisor, 1.0), 0.0)
  triplets = jnp.sum(t_pos)
  if reducers.parse(reduction)["name"] != "divisor":
    return _per_triplet(p, d, beta, margin, nu if learn_beta else None, beta_per_class,
                        labels, mined, reduction), {"triplets": triplets}
  if learn_beta:
    if beta_per_class:  # PML: nu * beta per triplet's anchor, over the same divisor
      reg = nu * jnp.sum(beta[:, 0] * jnp.sum(t_pos, 1))
      reg = jnp.where(divisor > 0, reg / jnp.where(divisor > 0, divisor, 1.0), 0.0)
    else:
      reg = nu * beta[0, 0]
    value = value + jnp.where(triplets > 0, reg, 0.0)
  return value, {"triplets": triplets}


def _per_triplet(p, d, beta, margin, nu, beta_per_class, labels, mined,  # pylint: disable=redefined-outer-name
                 reduction):
  """PML's loss dict, per triplet, reduced by `reduction` (nu None: fixed beta)."""
  if mined is not None:
    raise ValueError("margin: reduction other than 'divisor' reduces PML's per-triplet "
                     "losses, which are built for all triplets only; drop mined= or the "
                     "reduction.")
  beta = jnp.broadcast_to(beta, (d.shape[0], 1))  # [B, 1]: the anchor's beta
  mask = p.pos[:, :, None] & p.neg[:, None, :]
  pos = jax.nn.relu(d - beta + margin)[:, :, None]
  neg = jax.nn.relu(beta - d + margin)[:, None, :]
  divisor = jnp.sum(jnp.where(mask, pos > 0, False)) + jnp.sum(jnp.where(mask, neg > 0, False))
  terms = {"margin_loss": reducers.Term(pos + neg, "triplet", mask=mask, divisor=divisor)}
  if nu is None:
    terms["beta_reg_loss"] = reducers.Term(jnp.zeros(()), "already_reduced")
  elif not beta_per_class:
    terms["beta_reg_loss"] = reducers.Term(nu * beta[0, 0], "already_reduced")
  else:  # one entry per triplet: its anchor's beta
    terms["beta_reg_loss"] = reducers.Term(
        jnp.broadcast_to(nu * beta[:, :, None], mask.shape), "element", mask=mask,
        divisor=divisor)
  value, _ = reducers.finish(terms, reduction, labels=labels, loss_name="margin",
                             zero=~jnp.any(mask))
  return value


def init_beta(rng: jax.Array, *, num_classes: int, dim: int, beta: float = 1.2,
              learn_beta: bool = False, beta_per_class: bool = False,
              **_: Any) -> dict[str, jax.Array]:
  """The learned beta of `margin(learn_beta=True)`: [num_classes] or [1].

  float32.
  """
  del rng, dim
  if not learn_beta:
    raise ValueError("margin has learnable parameters only with learn_beta=True.")
  return {"beta": jnp.full((num_classes if beta_per_class else 1,), beta, jnp.float32)}


def npairs(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
           ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
           ref_self_index: jax.Array | None = None,
           reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """N-pairs loss (Sohn 2016), PML's `NPairsLoss()`: one positive pair per
  label (its first sample and that sample's first positive, in batch
  order), then cross-entropy of each anchor against all pairs' positives
  over cosine similarities, averaged. Allocates [B, B]; in-batch only.
  `reduction`: any of jaxdml.losses.reducers over the anchors' ("element")
  losses.

  Shapes: `embeddings` float [B, D], `labels` int [B] (the reference set: `jaxdml.losses`); the
  loss is a float scalar.
  """
  pairs.reject_ref("npairs", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=None, ref_labels=None,
                    ref_valid=None, ref_self_index=None, loss_name="npairs")
  b = p.query.shape[0]
  before = jnp.tril(jnp.ones((b, b), bool), k=-1)  # [i, j]: j comes before i
  first = ~jnp.any(p.pos & before, axis=1)  # no earlier sample of the label
  anchor = first & jnp.any(p.pos, axis=1)  # ... and it has a positive
  positive = jnp.argmax(p.pos, axis=1)  # its first positive
  sim = distances.cosine_matrix(p.query, p.query[positive])  # [anchors, positives]
  both = anchor[:, None] & anchor[None, :]
  logits = jnp.where(both, sim, -jnp.inf)
  log_p = jnp.diagonal(logits) - jax.nn.logsumexp(jnp.where(both, logits, -1e30), axis=1)
  losses = jnp.where(anchor, -log_p, 0.0)
  count = jnp.sum(anchor)
  value, _ = reducers.finish({"loss": reducers.Term(losses, "element", mask=anchor)}, reduction,
                             labels=labels, loss_name="npairs")
  return value, {"pairs": count.astype(jnp.float32)}
