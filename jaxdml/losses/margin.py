"""Margin loss and N-pairs, equal to pytorch-metric-learning 2.9.0's
`MarginLoss` (all triplets, fixed beta) and `NPairsLoss`."""
import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import pairs


def margin(*, embeddings, labels, ref_embeddings=None, ref_labels=None, ref_valid=None,
           ref_self_index=None, margin=0.2, beta=1.2, distance="euclidean"):  # pylint: disable=redefined-outer-name
  """Margin loss (Wu et al. 2017) over every triplet (a, p, n), PML's
  `MarginLoss()`: [d_ap - beta + margin]_+ + [beta - d_an + margin]_+,
  summed over triplets and divided by the number of non-zero terms.

  Over all triplets that sum is, per anchor, |N_a| times its positive
  terms plus |P_a| times its negative terms, so it allocates [B, R] where
  PML builds every triplet. `distance` as in jaxdml.losses (PML's default
  L2-normalises first: feed normalised embeddings). beta is fixed (PML's
  `learn_beta=False` default).
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="margin")
  d = distances.dissimilarity(distances.pairwise(p.query, p.ref, distance=distance),
                              distance=distance)
  pos = jnp.where(p.pos, jax.nn.relu(d - beta + margin), 0.0)
  neg = jnp.where(p.neg, jax.nn.relu(beta - d + margin), 0.0)
  n_pos, n_neg = jnp.sum(p.pos, 1), jnp.sum(p.neg, 1)  # per anchor
  total = jnp.sum(n_neg * jnp.sum(pos, 1) + n_pos * jnp.sum(neg, 1))
  divisor = jnp.sum(n_neg * jnp.sum(pos > 0, 1) + n_pos * jnp.sum(neg > 0, 1))
  value = jnp.where(divisor > 0, total / jnp.maximum(divisor, 1), 0.0)
  return value, {"triplets": jnp.sum(n_pos * n_neg).astype(jnp.float32)}


def npairs(*, embeddings, labels, ref_embeddings=None, ref_labels=None, ref_valid=None,
           ref_self_index=None):
  """N-pairs loss (Sohn 2016), PML's `NPairsLoss()`: one positive pair per
  label (its first sample and that sample's first positive, in batch
  order), then cross-entropy of each anchor against all pairs' positives
  over cosine similarities, averaged. Allocates [B, B]; in-batch only."""
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
  value = jnp.where(count > 0, jnp.sum(losses) / jnp.maximum(count, 1), 0.0)
  return value, {"pairs": count.astype(jnp.float32)}
