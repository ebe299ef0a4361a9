"""Student/teacher embedding losses: plain distillation and RAML.

The teacher is frozen: its embeddings always pass through stop_gradient, so a
caller may hand in any array (e.g. a teacher forward pass in the same jit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import pairs
from jaxdml.losses import reducers

DISTILL_MODES = ("mse", "cosine", "relational")


def _student_teacher(embeddings, teacher_embeddings, loss_name):
  s = distances.as_float(embeddings)
  if teacher_embeddings is None:
    raise ValueError(f"{loss_name}: teacher_embeddings are required.")
  t = jax.lax.stop_gradient(distances.as_float(teacher_embeddings))
  if s.ndim != 2 or s.shape != t.shape:
    raise ValueError(
        f"{loss_name}: embeddings {s.shape} and teacher_embeddings {t.shape}"
        " must both be [B, D] of the same shape (project the student to the"
        " teacher's dimension first).")
  return s, t


def _offdiag_mse(a, b):
  """Mean of (a - b)^2 over the off-diagonal entries of [..., V, V]."""
  v = a.shape[-1]
  off = ~jnp.eye(v, dtype=bool)
  sq = jnp.where(off, (a - b) ** 2, 0.0)
  return jnp.sum(sq, axis=(-2, -1)) / (v * (v - 1))


def embedding_distill(*, embeddings: jax.Array, labels: jax.Array | None = None,
                      ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                      ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                      teacher_embeddings: jax.Array, mode: str = "mse") -> reducers.LossAndAux:
  """Student embeddings regress the frozen teacher's (PAPERS.md section 1).

  Args:
    embeddings: float [B, D] student embeddings.
    labels: accepted and unused.
    teacher_embeddings: float [B, D], same images, under stop_gradient.
    mode: "mse" (mean over all elements, torch's `mse_loss`, raw embeddings),
      "cosine" (mean of 1 - cos(s_i, t_i)) or "relational" (MSE between the
      student's and teacher's [B, B] cosine-similarity matrices, diagonal
      excluded).

  Returns:
    (loss, aux) with aux `cosine` (mean cos(s_i, t_i), a progress gauge).
  """
  del labels
  pairs.reject_ref("embedding_distill", ref_embeddings=ref_embeddings,
                   ref_labels=ref_labels, ref_valid=ref_valid,
                   ref_self_index=ref_self_index)
  if mode not in DISTILL_MODES:
    raise ValueError(
        f"mode={mode!r} is not supported; use one of {DISTILL_MODES}.")
  s, t = _student_teacher(embeddings, teacher_embeddings, "embedding_distill")
  cos = jnp.sum(distances.l2_normalize(s) * distances.l2_normalize(t), -1)
  if mode == "mse":
    loss = jnp.mean((s - t) ** 2)
  elif mode == "cosine":
    loss = jnp.mean(1.0 - cos)
  else:
    if s.shape[0] < 2:
      raise ValueError("embedding_distill: relational mode needs B >= 2.")
    loss = _offdiag_mse(distances.cosine_matrix(s, s),
                        distances.cosine_matrix(t, t))
  return loss, {"cosine": jnp.mean(cos)}


def raml(*, embeddings: jax.Array, labels: jax.Array | None = None,
         ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
         ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
         teacher_embeddings: jax.Array, views_per_image: int = 8, lambda1: float = 0.7718,
         lambda2: float = 0.6684, reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """RAML asymmetric student/teacher loss (PAPERS.md section 3).

  With s, t the L2-normalised student (low resolution) and teacher (high
  resolution) embeddings of the same views, per image over its V views:
    mean_v (1 - s_v.t_v)^2 + lambda1 * mse(S T^T, T T^T)
                           + lambda2 * mse(S S^T, T T^T),
  the mse over off-diagonal entries only, as pavelsuma/raml
  (`lib/layers/functional.py`). Defaults lambda1/lambda2 are the CUB values.

  Args:
    embeddings: float [N * V, D] student embeddings, the V views of one image
      contiguous.
    labels: accepted and unused.
    teacher_embeddings: float [N * V, D], same layout.
    views_per_image: V (>= 2 when a lambda is non-zero).
    reduction: "mean" over images (our default: the scale does not depend on
      the batch) or "sum" (the reference code, which sums over images).
      The reference also adds eps=1e-6 inside each square; we do not.

  Returns:
    (loss, aux) with aux `absolute`, `relative_st`, `relative_ss` (the
    three terms, image-averaged, unweighted).
  """
  del labels
  pairs.reject_ref("raml", ref_embeddings=ref_embeddings,
                   ref_labels=ref_labels, ref_valid=ref_valid,
                   ref_self_index=ref_self_index)
  if reduction not in ("mean", "sum"):
    raise ValueError(
        f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
  s, t = _student_teacher(embeddings, teacher_embeddings, "raml")
  b, d = s.shape
  v = int(views_per_image)
  if v < 1 or b % v:
    raise ValueError(
        f"raml: the batch of {b} embeddings is not a whole number of images"
        f" with views_per_image={views_per_image}.")
  if v < 2:
    raise ValueError("raml: views_per_image must be >= 2 (the similarity"
                     " terms are over the off-diagonal views of one image).")
  s = distances.l2_normalize(s).reshape(b // v, v, d)
  t = distances.l2_normalize(t).reshape(b // v, v, d)
  mm = lambda x, y: jnp.einsum("nvd,nwd->nvw", x, y,
                               precision=jax.lax.Precision.HIGHEST)
  tt = mm(t, t)
  absolute = jnp.mean((1.0 - jnp.sum(s * t, axis=-1)) ** 2, axis=-1)
  rel_st = _offdiag_mse(mm(s, t), tt)
  rel_ss = _offdiag_mse(mm(s, s), tt)
  per_image = absolute + lambda1 * rel_st + lambda2 * rel_ss
  loss = jnp.mean(per_image) if reduction == "mean" else jnp.sum(per_image)
  aux = {"absolute": jnp.mean(absolute), "relative_st": jnp.mean(rel_st),
         "relative_ss": jnp.mean(rel_ss)}
  return loss, aux
