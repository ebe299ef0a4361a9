"""VICReg (Bardes et al. 2022), PML 2.9.0's `VICRegLoss`: a self-supervised
loss on two views of the same batch, without labels or negatives.

The two views are `embeddings` and `ref_embeddings` (PML's `embeddings` and
`ref_emb`), row i of one the same image as row i of the other. Here
`ref_embeddings` is the second view, not a reference set of labelled
candidates: the loss consumes no cross-batch memory, and the caller passes
the second view.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import reducers

_HIGHEST = jax.lax.Precision.HIGHEST


def _variance_terms(z, eps):
  """per dim relu(1 - sqrt(Var(z_d) + eps)) / 2, unbiased variance."""
  std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
  return jax.nn.relu(1.0 - std) / 2.0


def _covariance_term(z):
  """Sum of the squared off-diagonal entries of the unbiased covariance, / D."""
  n, d = z.shape
  centred = z - jnp.mean(z, axis=0)
  cov = jnp.matmul(centred.T, centred, precision=_HIGHEST) / (n - 1)
  off_diagonal = cov * (1.0 - jnp.eye(d, dtype=cov.dtype))
  return jnp.sum(off_diagonal * off_diagonal) / d


def vicreg(*, embeddings: jax.Array, ref_embeddings: jax.Array | None = None,
           labels: jax.Array | None = None, invariance_lambda: float = 25.0,
           variance_mu: float = 25.0, covariance_v: float = 1.0, eps: float = 1e-4,
           reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')] on the raw rows.

  Args:
    embeddings: float [B, D], the first view Z.
    ref_embeddings: float [B, D], the second view Z' (required).
    labels: ignored (PML refuses labels).
    invariance_lambda, variance_mu, covariance_v: lambda, mu and nu.
    eps: inside the standard deviation's square root.
    reduction: any of jaxdml.losses.reducers, applied as PML's to its
      sub-losses: "invariance_loss" (element, per row), "variance_loss1"
      and "variance_loss2" (element, per dimension) and the already reduced
      "covariance_loss"; PML's MeanReducer.

  s is the mean squared difference of the views; v(Z) the mean over the D
  dimensions of relu(1 - std_d) / 2 (PML halves each view's term); c(Z) the
  sum of squared off-diagonal covariances / D. B >= 2 (unbiased variances).

  Returns:
    (loss, aux) with aux `invariance`, `variance` and `covariance`, each
    already weighted (they sum to the loss).
  """
  del labels
  if ref_embeddings is None:
    raise ValueError("vicreg compares two views of the batch: pass the second view as "
                     "ref_embeddings=, row i the same image as row i of embeddings.")
  z, z_ref = distances.as_float(embeddings), distances.as_float(ref_embeddings)
  if z.ndim != 2 or z.shape != z_ref.shape or z.shape[0] < 2:
    raise ValueError(f"vicreg: embeddings and ref_embeddings must be two views of the same "
                     f"[B, D] batch with B >= 2, got {z.shape} and {z_ref.shape}.")
  covariance = covariance_v * (_covariance_term(z) + _covariance_term(z_ref))
  value, parts = reducers.finish(
      {"invariance_loss": reducers.Term(
          invariance_lambda * jnp.mean(jnp.square(z - z_ref), axis=1), "element"),
       "variance_loss1": reducers.Term(variance_mu * _variance_terms(z, eps), "element"),
       "variance_loss2": reducers.Term(variance_mu * _variance_terms(z_ref, eps), "element"),
       "covariance_loss": reducers.Term(covariance, "already_reduced")},
      reduction, loss_name="vicreg")
  aux = {"invariance": parts.get("invariance_loss", 0.0),
         "variance": parts.get("variance_loss1", 0.0) + parts.get("variance_loss2", 0.0),
         "covariance": covariance}
  return value, aux
