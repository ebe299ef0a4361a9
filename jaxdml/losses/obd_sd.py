"""OBD-SD: progressive self-distillation with online batch diffusion.

PAPERS.md section 4 (Zeng et al. 2022), checked against the authors' code
(ZelongZeng/OBD-SD_Pytorch, `criteria/multisimilarity_obd_sd.py`). With
T, S the teacher's and student's in-batch cosine-similarity matrices:
  W      = row-softmax((T - 1e9 I) / tau_d)          (no self-affinity)
  target = (1 - omega) (I - omega W)^{-1} softmax(T / tau)
  loss   = progress * lambda_ * tau^2 * KL(target || softmax(S / tau))
with KL summed over entries and averaged over rows (torch "batchmean").
The diagonal is *included* in softmax(T / tau) and softmax(S / tau), as in
the authors' code; only W masks it. The inverse is applied with
`jnp.linalg.solve`. omega = 0 gives the plain softmax(T / tau) target.

This is only the distillation term: the ranking loss (Multi-Similarity in the
paper) is computed and added by the caller. `progress` is epoch / epochs in
[0, 1] and may be a traced scalar.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import pairs
from jaxdml.losses import reducers


def diffusion_target(teacher_sim: jax.Array, *, tau: float, tau_d: float,
                     omega: float) -> jax.Array:
  """(1 - omega) (I - omega W)^{-1} softmax(T / tau), rows summing to 1.

  `teacher_sim` float [B, B]; the result float [B, B].
  """
  b = teacher_sim.shape[0]
  eye = jnp.eye(b, dtype=teacher_sim.dtype)
  w = jax.nn.softmax((teacher_sim - 1e9 * eye) / tau_d, axis=1)
  p = jax.nn.softmax(teacher_sim / tau, axis=1)
  return (1.0 - omega) * jnp.linalg.solve(eye - omega * w, p)


def obd_sd(*, embeddings: jax.Array, labels: jax.Array | None = None,
           ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
           ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
           teacher_embeddings: jax.Array, progress: jax.Array | float, tau: float = 1.0,
           tau_d: float = 1.0, omega: float = 0.3, lambda_: float = 1000.0) -> reducers.LossAndAux:
  """OBD-SD distillation term (the ranking loss is added by the caller).

  Args:
    embeddings: float [B, D] student embeddings (L2-normalised here).
    labels: accepted and unused.
    teacher_embeddings: float [B, D]: the previous epoch's weights on the same
      batch; under stop_gradient.
    progress: epoch / total epochs in [0, 1] (required; may be traced).
    tau, tau_d, omega, lambda_: as the paper; defaults are its CUB values
      (lambda 1000, omega 0.3, tau_d 1, tau 1). Cars: lambda_ 75, omega 0.99;
      SOP: lambda_ 100, omega 0.5, tau_d 0.005.

  Returns:
    (loss, aux) with aux `kl` (the unscaled KL).
  """
  del labels
  pairs.reject_ref("obd_sd", ref_embeddings=ref_embeddings,
                   ref_labels=ref_labels, ref_valid=ref_valid,
                   ref_self_index=ref_self_index)
  s = distances.as_float(embeddings)
  t = jax.lax.stop_gradient(distances.as_float(teacher_embeddings))
  if s.ndim != 2 or s.shape != t.shape or s.shape[0] < 2:
    raise ValueError(
        f"obd_sd: embeddings {s.shape} and teacher_embeddings {t.shape} must"
        " both be [B, D] with the same shape and B >= 2.")
  target = diffusion_target(distances.cosine_matrix(t, t), tau=tau,
                            tau_d=tau_d, omega=omega)
  target = jax.lax.stop_gradient(jnp.maximum(target, 0.0))  # solve rounding
  log_q = jax.nn.log_softmax(distances.cosine_matrix(s, s) / tau, axis=1)
  kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_q)
  kl = kl / s.shape[0]
  return progress * lambda_ * tau**2 * kl, {"kl": kl}
