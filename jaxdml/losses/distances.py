"""Pairwise distance and similarity matrices shared by the ranking losses.

Three choices, named as in the loss hyperparameter `distance`:
- "cosine": dot product of L2-normalised rows (pytorch-metric-learning's
  `CosineSimilarity`); a *similarity*, larger means closer.
- "euclidean": ||x - y|| on the raw rows. Unlike PML's default `LpDistance`
  this does not L2-normalise first (SBIR embeddings end in BatchNorm, not L2);
  give L2-normalised embeddings to reproduce PML's default.
- "squared_euclidean": ||x - y||^2 on the raw rows (PML `LpDistance(power=2)`).

Matmuls run at HIGHEST precision: the expansion |x|^2 + |y|^2 - 2 x.y loses
everything to cancellation at bfloat16 pass precision (TPU default), and the
loss costs nothing next to the encoder.
"""
import jax
import jax.numpy as jnp

DISTANCES = ("cosine", "euclidean", "squared_euclidean")
_HIGHEST = jax.lax.Precision.HIGHEST


def check_distance(distance):
  if distance not in DISTANCES:
    raise ValueError(
        f"distance={distance!r} is not supported; use one of {DISTANCES}.")


def is_similarity(distance):
  """True when larger values of the matrix mean closer (PML `is_inverted`)."""
  check_distance(distance)
  return distance == "cosine"


def as_float(x):
  """At least float32: bfloat16 embeddings lose the margins entirely."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x, eps=1e-12):
  """x / max(||x||, eps) along the last axis, as torch F.normalize.

  Written with a clamped rsqrt so a zero row has a zero (not NaN) gradient.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def safe_sqrt(x):
  """sqrt with gradient 0 (not inf/NaN) where x <= 0, e.g. duplicate rows."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def safe_norm(x, axis=-1):
  return safe_sqrt(jnp.sum(x * x, axis=axis))


def cosine_matrix(x, y):
  return jnp.matmul(l2_normalize(x), l2_normalize(y).T, precision=_HIGHEST)


def squared_euclidean_matrix(x, y):
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  xy = jnp.matmul(x, y.T, precision=_HIGHEST)
  # Rounding can make the expansion slightly negative for equal rows.
  return jnp.maximum(xx + yy - 2.0 * xy, 0.0)


def pairwise(x, y, *, distance):
  """[N, D] x [M, D] -> [N, M] matrix of `distance` (a similarity for cosine)."""
  check_distance(distance)
  if distance == "cosine":
    return cosine_matrix(x, y)
  d2 = squared_euclidean_matrix(x, y)
  return d2 if distance == "squared_euclidean" else safe_sqrt(d2)


def dissimilarity(mat, *, distance):
  """Map the matrix to "smaller is closer" so one code path serves all three.

  For cosine this is -s; PML's `distance.margin(ap, an)` (= an - ap for a
  similarity) then equals dis_ap - dis_an bit for bit, negation being exact.
  """
  return -mat if is_similarity(distance) else mat
