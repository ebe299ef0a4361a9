"""Manifold loss (Aziere & Todorovic 2019), PML 2.9.0's `ManifoldLoss`.

An unsupervised loss: K learnable proxies join the batch in one graph, a
random walk on it gives every node's manifold similarity to every other,
and each embedding is pushed towards the proxy it was assigned to
("meta class") and away from the others. It takes no labels, as in PML.

The proxies are `loss_params["proxies"]` [K, D], the layout of PML's
`proxies` parameter; K is the hyperparameter `K` and `init_manifold` draws
them as PML does (N(0, 1)). The assignment of embeddings to proxies is
PML's `indices_tuple` (`meta_classes=`, int [B] in [0, K)) or, as PML does
without one, drawn at random: every proxy once, the other B - K rows
uniformly, shuffled (`draw_meta_classes`, from `rng=`). PML draws from
torch's global generator; ours from the key it is given.

Allocates [B + K, B + K] and inverts it (O((B + K)^3)).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers
from jaxdml.losses import pairs

_HIGHEST = jax.lax.Precision.HIGHEST


def draw_meta_classes(rng: jax.Array, batch_size: int, num_proxies: int) -> jax.Array:
  """PML's draw: [0, K) once each, then B - K uniform draws, shuffled; int32 [B]."""
  if batch_size < num_proxies:
    raise ValueError(f"manifold: a batch of {batch_size} cannot be spread over K="
                     f"{num_proxies} proxies (PML needs B >= K); lower K or pass "
                     "meta_classes=.")
  fill_rng, order_rng = jax.random.split(rng)
  extra = jax.random.randint(fill_rng, (batch_size - num_proxies,), 0, num_proxies)
  assigned = jnp.concatenate([jnp.arange(num_proxies), extra]).astype(jnp.int32)
  return jax.random.permutation(order_rng, assigned)


def _hinge_log_sum_exp(scores, own, margin):
  """mean_i log(1 + sum_j exp(s_ij - s_i,own_i + margin)) over the j other
  than own_i where that exponent is >= 0; PML sets the others to -inf (no
  loss, no gradient)."""
  gap = scores - jnp.take_along_axis(scores, own[:, None], axis=1) + margin
  not_own = jnp.arange(scores.shape[1])[None, :] != own[:, None]
  keep = not_own & (gap >= 0)
  # Masked inside exp too: a left-out entry may not overflow in the backward pass.
  terms = jnp.where(keep, jnp.exp(jnp.where(keep, gap, 0.0)), 0.0)
  return jnp.mean(jnp.log1p(jnp.sum(terms, axis=1)))


def manifold(*, embeddings: jax.Array, loss_params: Mapping[str, jax.Array],
             labels: jax.Array | None = None, rng: jax.Array | None = None,
             meta_classes: jax.Array | None = None, K: int = 50, lambdaC: float = 1.0,
             alpha: float = 0.8, margin: float = 5e-4, distance: distances.DistanceLike = "cosine",
             ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
             ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
             reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """PML's `ManifoldLoss(l=D, K, lambdaC, alpha, margin)`.

  Args:
    embeddings: float [B, D].
    loss_params: {"proxies": float [K, D]}.
    labels: ignored (the loss is unsupervised; PML refuses labels).
    rng: a jax key for the random assignment; or
    meta_classes: int [B] in [0, K), each embedding's proxy (PML's
      `indices_tuple`). One of the two is required.
    K: the number of proxies (the rows of `loss_params["proxies"]`).
    lambdaC: weight of the context loss, >= 0; `inf` means the context loss
      alone (PML's docstring; PML's code returns inf there).
    alpha: the random walk's propagation, in (0, 1).
    margin: the margin of both hinge terms.
    distance: the similarity on the graph (jaxdml.losses.distances), PML's
      default `CosineSimilarity()`.

  Similarities S = exp(max(sim, 0) / 0.5) off the diagonal, symmetrically
  normalised, F = (1 - alpha)(I - alpha S_bar)^-1. The intrinsic loss looks
  at F's embedding-to-proxy block, the context loss at the cosines of F's
  embedding rows with its proxy rows; both are mean_i log(1 + sum_j
  exp(f_ij - f_i,own + margin)) over the proxies j that score above the
  own one minus the margin. Loss: intrinsic + lambdaC * context.

  Returns:
    (loss, aux) with aux `intrinsic` and `context` (unweighted).
  """
  reducers.check_reducible(reduction, "mean", "manifold")
  del labels
  pairs.reject_ref("manifold", ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                   ref_valid=ref_valid, ref_self_index=ref_self_index)
  if lambdaC < 0:
    raise ValueError(f"manifold: lambdaC={lambdaC} must be >= 0 (inf: the context loss "
                     "alone).")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"manifold: alpha={alpha} must lie in (0, 1): the random walk "
                     "passes that share of similarity on (PML's range).")
  x = distances.as_float(embeddings)
  proxies = distances.as_float(loss_params["proxies"])
  if x.ndim != 2 or proxies.shape != (int(K), x.shape[-1]):
    raise ValueError(f"manifold: embeddings [B, D] and loss_params['proxies'] [K={K}, D] "
                     f"expected, got {x.shape} and {proxies.shape}; init_params makes K "
                     "rows.")
  n = x.shape[0]
  if meta_classes is None:
    if rng is None:
      raise ValueError("manifold assigns every embedding to a proxy at random, as PML "
                       "does: pass rng= (a jax key), or meta_classes= (int [B]).")
    meta_classes = draw_meta_classes(rng, n, int(K))
  meta_classes = jnp.asarray(meta_classes)
  if meta_classes.shape != (n,) or not jnp.issubdtype(meta_classes.dtype, jnp.integer):
    raise ValueError(f"manifold: meta_classes must be int [{n}] (a proxy per embedding), "
                     f"got {meta_classes.dtype} {meta_classes.shape}.")

  nodes = jnp.concatenate([x, proxies], axis=0)
  total = nodes.shape[0]
  eye = jnp.eye(total, dtype=x.dtype)
  sim = distances.pairwise(nodes, nodes, distance=distance)
  affinity = jnp.exp(jnp.maximum(sim, 0.0) / 0.5) * (1.0 - eye)
  inv_sqrt_degree = jax.lax.rsqrt(jnp.sum(affinity, axis=1))
  walk = inv_sqrt_degree[:, None] * affinity * inv_sqrt_degree[None, :]
  spread = (1.0 - alpha) * jnp.linalg.inv(eye - alpha * walk)

  intrinsic = jnp.zeros((), x.dtype)
  if not math.isinf(lambdaC):
    intrinsic = _hinge_log_sum_exp(spread[:n, n:], meta_classes, margin)
  context_cos = jnp.matmul(distances.l2_normalize(spread[:n]),
                           distances.l2_normalize(spread[n:]).T, precision=_HIGHEST)
  context = _hinge_log_sum_exp(context_cos, meta_classes, margin)
  loss = context if math.isinf(lambdaC) else intrinsic + lambdaC * context
  return loss, {"intrinsic": intrinsic, "context": context}


def init_manifold(rng: jax.Array, *, num_classes: int, dim: int, K: int = 50,
                  **hparams: Any) -> dict[str, jax.Array]:
  """PML's `torch.randn(K, l)`: K proxies of N(0, 1) entries, [K, dim];
  `num_classes` is unused (the loss has no classes).

  float32.
  """
  del num_classes, hparams
  return {"proxies": jax.random.normal(rng, (int(K), dim), jnp.float32)}
