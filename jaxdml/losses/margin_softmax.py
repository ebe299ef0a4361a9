"""Angular-margin softmax losses and P2SGrad: one learnable vector per class.

Large-margin softmax (L-Softmax, Liu et al. 2016), SphereFace (Liu et al.
2017) and P2SGrad (Zhang et al. 2019), each equal to pytorch-metric-learning
2.9.0's class of the same name in value and in gradients w.r.t. the
embeddings and the class vectors. As in jaxdml.losses.proxies, the class
vectors are `loss_params["proxies"]` [num_classes, dim]: PML's `W` / `weight`
[dim, num_classes] transposed. Labels must lie in [0, num_classes). Each
allocates [B, C] and rejects a reference set, as PML does.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers
from jaxdml.losses import proxies as proxies_lib


def _check_margin(name, margin) -> int:
  # PML casts with int(): margin=4.7 is 4; the multiple-angle formula needs m >= 1.
  m = int(margin)
  if m < 1:
    raise ValueError(f"{name}: margin={margin!r} must be an integer >= 1 (the angle "
                     "multiplier m of cos(m theta)).")
  return m


def _cos_of_multiple_angle(cos, m: int):
  """cos(m theta) from c = cos(theta) by the multiple-angle formula (PML's,
  the paper's equation 7): sum_n (-1)^n binom(m, 2n) c^(m-2n) (1-c^2)^n,
  with static integer powers, so the gradient is finite at c = +-1."""
  sin_sq = 1.0 - cos * cos
  return sum((-1) ** n * math.comb(m, 2 * n) * cos ** (m - 2 * n) * sin_sq ** n
             for n in range(m // 2 + 1))


def _large_margin(name, embeddings, labels, loss_params, margin, scale, class_norms, ref_set,
                  reduction):
  """Cross-entropy over the L-Softmax logits ||x_i|| (||w_c|| if
  `class_norms`) scale psi_ic, psi = cosine except at the own class."""
  x, table, _, one_hot = proxies_lib.prepare(name, embeddings, labels, loss_params, ref_set)
  m = _check_margin(name, margin)
  cos = distances.cosine_matrix(x, table)
  target = jnp.sum(one_hot * cos, axis=-1)
  # k: which of the m arcs [k pi/m, (k+1) pi/m] theta lies on (constant
  # pieces: no gradient). psi = (-1)^k cos(m theta) - 2k is continuous and
  # decreasing in theta.
  angles = jnp.arccos(jnp.clip(jax.lax.stop_gradient(target), -1.0, 1.0))
  k = jnp.floor(angles / (math.pi / m))
  psi = (1.0 - 2.0 * jnp.mod(k, 2.0)) * _cos_of_multiple_angle(target, m) - 2.0 * k
  logits = cos + one_hot * (psi - target)[:, None]
  magnitudes = distances.safe_norm(x)[:, None]
  if class_norms:
    magnitudes = magnitudes * distances.safe_norm(table)[None, :]
  loss, _ = reducers.finish(
      {"loss": reducers.Term(proxies_lib.cross_entropy(logits * magnitudes * scale, one_hot),
                             "element")}, reduction, labels=labels, loss_name=name)
  return loss, {"avg_angle": jnp.degrees(jnp.mean(angles))}


def large_margin_softmax(*, embeddings: jax.Array, labels: jax.Array,
                         loss_params: Mapping[str, jax.Array], margin: float = 4,
                         scale: float = 1.0, ref_embeddings: jax.Array | None = None,
                         ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
                         ref_self_index: jax.Array | None = None,
                         reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Large-margin softmax (Liu et al. 2016), PML's `LargeMarginSoftmaxLoss`.

  Args:
    embeddings: float [B, D], any norm.
    labels: int [B] in [0, C).
    loss_params: {"proxies": float [C, D]}, the class vectors w_c.
    margin: the integer m: the own class's logit uses cos(m theta) (made
      monotone, see `_large_margin`) in place of cos(theta).
    scale: multiplies every logit.
    reduction: any of jaxdml.losses.reducers over the per-sample
      ("element") cross-entropies; PML's MeanReducer.

  The logit of class c is ||w_c|| ||x_i|| cos(theta_ic) * scale, i.e.
  w_c . x_i, with the own class's cosine replaced; cross-entropy, averaged
  over the batch (PML's MeanReducer).

  Returns:
    (loss, aux): aux `avg_angle`, the mean angle in degrees between each
    embedding and its class vector (PML's recorded `avg_angle`).
  """
  return _large_margin("large_margin_softmax", embeddings, labels, loss_params, margin, scale,
                       True, proxies_lib.refs(ref_embeddings, ref_labels, ref_valid,
                                              ref_self_index), reduction)


def sphereface(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
               margin: float = 4, scale: float = 1.0, ref_embeddings: jax.Array | None = None,
               ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
               ref_self_index: jax.Array | None = None,
               reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """SphereFace / A-Softmax (Liu et al. 2017), PML's `SphereFaceLoss`.

  `large_margin_softmax` with the class vectors' norms left out of the
  logits: ||x_i|| psi_ic * scale (PML's subclass overrides only that).
  Same arguments and aux.

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  return _large_margin("sphereface", embeddings, labels, loss_params, margin, scale,
                       False, proxies_lib.refs(ref_embeddings, ref_labels, ref_valid,
                                               ref_self_index), reduction)


def p2s_grad(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
             ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
             ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
             reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """P2SGrad (Zhang et al. 2019), PML's `P2SGradLoss`; no hyperparameters.

  The mean over [B, C] of (cos theta_ic - [c == y_i])^2, cosines clipped to
  [-1, 1]: the MSE whose gradient is the paper's equation 11.

  PML renormalises its `weight` to unit columns in place before every call
  and differentiates w.r.t. the renormalised tensor. A pure function cannot
  rewrite its parameters, so the class vectors are normalised by a
  straight-through step: the value is computed with unit rows and the
  gradient is PML's gradient w.r.t. its unit-norm weight, for any table
  (`init_p2s_grad` draws unit rows, as PML's init does). Unlike PML, the
  stored table is not pulled back to unit norm between steps; only its
  direction matters.

  Args:
    embeddings: float [B, D].
    labels: int [B] in [0, C).
    loss_params: {"proxies": float [C, D]}.
  """
  reducers.check_reducible(reduction, "mean", "p2s_grad")
  x, table, _, one_hot = proxies_lib.prepare(
      "p2s_grad", embeddings, labels, loss_params,
      proxies_lib.refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  unit = table + jax.lax.stop_gradient(distances.l2_normalize(table) - table)
  cos = jnp.matmul(distances.l2_normalize(x), unit.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.mean(jnp.square(jnp.clip(cos, -1.0, 1.0) - one_hot)), {}


def init_p2s_grad(rng: jax.Array, *, num_classes: int, dim: int,
                  **hparams: Any) -> dict[str, jax.Array]:
  """PML's P2SGrad init: U(-1, 1) entries, each class vector scaled to unit
  length (`uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`).

  `{"proxies": float32 [num_classes, dim]}`, unit rows.
  """
  del hparams
  table = jax.random.uniform(rng, (num_classes, dim), jnp.float32, -1.0, 1.0)
  return {"proxies": distances.l2_normalize(table)}
