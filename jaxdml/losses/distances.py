"""Distances and similarities of the losses and miners: PML's, as values.

A loss's or miner's `distance=` names one of pytorch-metric-learning's
distance classes with its settings, and means what that class computes:

| `distance=`            | PML                                   |
|------------------------|---------------------------------------|
| "euclidean"            | `LpDistance()`                        |
| "squared_euclidean"    | `LpDistance(power=2)`                 |
| "lp" (with `p=`)       | `LpDistance(p=...)`                   |
| "cosine"               | `CosineSimilarity()`                  |
| "dot"                  | `DotProductSimilarity()`              |
| "snr"                  | `SNRDistance()`                       |

Like PML's, every one L2-normalises the rows first (Lp-normalises with its
own p), so the gradient goes through the normalisation. Settings other
than the name come as a dict (a config's form) or a `Distance`:

    distance=dict(name="euclidean", normalize_embeddings=False)  # raw rows
    distance=dict(name="lp", p=1)                                 # Manhattan
    distance=distances.LpDistance(normalize_embeddings=False)

Raw rows are what BatchNorm-ended embeddings need (the SBIR recipes say
so in their config). "cosine" always normalises, as PML's asserts; "dot"
normalises by default as PML's `DotProductSimilarity` does, so only
`dict(name="dot", normalize_embeddings=False)` is the raw inner product.
A `Distance` is hashable, so it can be a static argument of `jax.jit`.

Matmuls run at HIGHEST precision: the expansion |x|^2 + |y|^2 - 2 x.y loses
everything to cancellation at bfloat16 pass precision (TPU default), and the
loss costs nothing next to the encoder. Square roots and p-th roots are safe
at 0: duplicate rows get a zero gradient, never NaN.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

KINDS = ("lp", "dot", "snr")
_HIGHEST = jax.lax.Precision.HIGHEST
_EPS = 1e-12  # torch.nn.functional.normalize's


@dataclasses.dataclass(frozen=True)
class Distance:
  """One of PML's distances with its settings (PML's `BaseDistance` fields).

  `kind` "lp" is `LpDistance` (||x - y||_p ** power), "dot" the inner
  product (a similarity: larger is closer, PML's `is_inverted`), "snr" the
  signal-to-noise ratio distance Var(x - y) / Var(x).
  """
  kind: str = "lp"
  p: float = 2.0
  power: float = 1.0
  normalize_embeddings: bool = True
  # How it was asked for, for messages; not part of what it computes.
  name: str = dataclasses.field(default="", compare=False)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Distance kind {self.kind!r}: expected one of {KINDS}.")
    if not float(self.p) > 0:
      raise ValueError(f"Distance p={self.p}: expected p > 0.")

  @property
  def is_inverted(self) -> bool:
    """True when larger values mean closer (a similarity), PML's `is_inverted`."""
    return self.kind == "dot"

  def __str__(self) -> str:
    return self.name or repr(self)

  def normalize(self, x: jax.Array) -> jax.Array:
    """`x / max(||x||_p, 1e-12)` along the last axis (torch's F.normalize).

    `x` float [..., D]; the result has its shape and dtype.
    """
    if float(self.p) == 2.0:
      return l2_normalize(x)
    norm = safe_pow(jnp.sum(jnp.abs(x) ** self.p, axis=-1, keepdims=True), 1.0 / self.p)
    return x / jnp.maximum(norm, _EPS)

  def matrix(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """[N, D] x [M, D] -> [N, M].

    Float, the rows' dtype.
    """
    x, y = as_float(x), as_float(y)
    if self.normalize_embeddings:
      x, y = self.normalize(x), self.normalize(y)
    if self.kind == "dot":
      mat = jnp.matmul(x, y.T, precision=_HIGHEST)
    elif self.kind == "snr":
      mat = snr_matrix(x, y)
    elif float(self.p) == 2.0:
      d2 = squared_euclidean_matrix(x, y)
      # power 2 is the squared distance itself: no root, no kink at 0.
      return d2 if float(self.power) == 2.0 else safe_pow(d2, self.power / 2.0)
    else:
      diff = jnp.abs(x[:, None, :] - y[None, :, :])  # [N, M, D]: only for p != 2
      mat = safe_pow(jnp.sum(diff ** self.p, axis=-1), 1.0 / self.p)
    return mat if float(self.power) == 1.0 else safe_pow(mat, self.power)


def LpDistance(p: float = 2.0, power: float = 1.0,  # pylint: disable=invalid-name
               normalize_embeddings: bool = True) -> Distance:
  """PML's `LpDistance(p, power, normalize_embeddings)`."""
  return Distance("lp", float(p), float(power), bool(normalize_embeddings), name="lp")


def CosineSimilarity(power: float = 1.0) -> Distance:  # pylint: disable=invalid-name
  """PML's `CosineSimilarity()`: the inner product of L2-normalised rows."""
  return Distance("dot", 2.0, float(power), True, name="cosine")


def DotProductSimilarity(power: float = 1.0,  # pylint: disable=invalid-name
                         normalize_embeddings: bool = True) -> Distance:
  """PML's `DotProductSimilarity()`; it normalises unless told not to."""
  return Distance("dot", 2.0, float(power), bool(normalize_embeddings), name="dot")


def SNRDistance(power: float = 1.0,  # pylint: disable=invalid-name
                normalize_embeddings: bool = True) -> Distance:
  """PML's `SNRDistance()`: Var(x - y) / Var(x), unbiased variances over D."""
  return Distance("snr", 2.0, float(power), bool(normalize_embeddings), name="snr")


NAMED = {
    "euclidean": LpDistance(),
    "squared_euclidean": LpDistance(power=2.0),
    "lp": LpDistance(),
    "cosine": CosineSimilarity(),
    "dot": DotProductSimilarity(),
    "snr": SNRDistance(),
}
NAMED = {name: dataclasses.replace(d, name=name) for name, d in NAMED.items()}
DISTANCES = tuple(NAMED)

DistanceLike = Union[str, Distance, Mapping[str, Any]]


def resolve(distance: DistanceLike) -> Distance:
  """The `Distance` a loss's `distance=` argument asks for (a name, a
  `{"name": ..., **settings}` dict, or a `Distance`); ValueError naming the
  choices otherwise."""
  if isinstance(distance, Distance):
    return distance
  if isinstance(distance, str):
    if distance not in NAMED:
      raise ValueError(f"distance={distance!r} is not supported; use one of {DISTANCES}, "
                       "or a dict(name=..., p=..., power=..., normalize_embeddings=...).")
    return NAMED[distance]
  if isinstance(distance, Mapping) or hasattr(distance, "to_dict"):
    from jaxdml.config import as_dict  # pylint: disable=g-import-not-at-top
    settings = as_dict(distance)
    base = resolve(settings.pop("name", "euclidean"))
    unknown = sorted(set(settings) - {"p", "power", "normalize_embeddings"})
    if unknown:
      raise ValueError(f"distance={dict(distance)!r}: unknown setting(s) {unknown}; a "
                       "distance takes name, p, power and normalize_embeddings.")
    if base.name == "cosine" and not settings.get("normalize_embeddings", True):
      raise ValueError("distance 'cosine' always normalises (PML's CosineSimilarity); "
                       "use dict(name='dot', normalize_embeddings=False) for raw dot products.")
    if "p" in settings and base.kind != "lp":
      raise ValueError(f"distance {base.name!r} takes no p; only 'lp'/'euclidean' do.")
    typed = {k: (bool(v) if k == "normalize_embeddings" else float(v))
             for k, v in settings.items()}
    changed = {k: v for k, v in typed.items() if getattr(base, k) != v}
    label = base.name + "".join(f",{k}={v}" for k, v in sorted(changed.items()))
    return dataclasses.replace(base, **typed, name=label)
  raise ValueError(f"distance={distance!r}: expected a name from {DISTANCES}, a dict "
                   "(name=..., **settings) or a jaxdml.losses.distances.Distance.")


def check_distance(distance: DistanceLike) -> Distance:
  """`resolve(distance)`: the `Distance`, or one ValueError naming the choices."""
  return resolve(distance)


def is_similarity(distance: DistanceLike) -> bool:
  """True when larger values of the matrix mean closer (PML `is_inverted`)."""
  return resolve(distance).is_inverted


def as_float(x: ArrayLike) -> jax.Array:
  """At least float32: bfloat16 embeddings lose the margins entirely.

  Any shape; float32 unless `x` is already a wider float.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, eps: float = _EPS) -> jax.Array:
  """x / max(||x||, eps) along the last axis, as torch F.normalize.

  Written with a clamped rsqrt so a zero row has a zero (not NaN) gradient.

  `x` float [..., D]; the result has its shape and dtype.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def safe_pow(x: jax.Array, exponent: float) -> jax.Array:
  """x ** exponent for x >= 0, with gradient 0 (not inf/NaN) where x <= 0.

  Elementwise: float `x` of any shape, the result the same.
  """
  pos = x > 0
  return jnp.where(pos, jnp.where(pos, x, 1.0) ** exponent, 0.0)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with gradient 0 (not inf/NaN) where x <= 0, e.g. duplicate rows.

  Elementwise: float `x` of any shape, the result the same.
  """
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm of float `x` along `axis` ([..., D] -> [...]), gradient 0 at a zero row."""
  return safe_sqrt(jnp.sum(x * x, axis=axis))


def cosine_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
  """Cosine similarities of the L2-normalised rows: float x [N, D], y [M, D] -> float [N, M]."""
  return jnp.matmul(l2_normalize(x), l2_normalize(y).T, precision=_HIGHEST)


def squared_euclidean_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared distances of the raw rows, clamped at 0: float x [N, D], y [M, D] -> float [N, M]."""
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  xy = jnp.matmul(x, y.T, precision=_HIGHEST)
  # Rounding can make the expansion slightly negative for equal rows.
  return jnp.maximum(xx + yy - 2.0 * xy, 0.0)


def snr_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
  """Var(x_i - y_j) / Var(x_i) with unbiased variances over the D axis
  (torch.var's default), from sums: no [N, M, D] tensor.

  Float [N, D] x [M, D] -> float [N, M].
  """
  d = x.shape[-1]
  mean_x, mean_y = jnp.mean(x, -1), jnp.mean(y, -1)
  gap = mean_x[:, None] - mean_y[None, :]
  pair_var = (squared_euclidean_matrix(x, y) - d * gap * gap) / (d - 1)
  # A constant anchor row has no variance: PML divides by 0 (inf or NaN);
  # the floor keeps the loss and its gradient finite, if huge.
  anchor_var = jnp.maximum(jnp.var(x, axis=-1, ddof=1), _EPS)
  return jnp.maximum(pair_var, 0.0) / anchor_var[:, None]


def pairwise(x: jax.Array, y: jax.Array, *, distance: DistanceLike,
             chunk_size: int | None = None) -> jax.Array:
  """[N, D] x [M, D] -> [N, M] matrix of `distance` (a similarity for
  "cosine" and "dot"). `chunk_size`: see `batched`.

  Float, the rows' dtype.
  """
  if chunk_size is not None:
    return batched(x, y, distance=distance, chunk_size=chunk_size)
  return resolve(distance).matrix(x, y)


def batched(x: jax.Array, y: jax.Array, *, distance: DistanceLike,
            chunk_size: int = 4096) -> jax.Array:
  """`pairwise(x, y)` computed `chunk_size` reference rows (of `y`) at a
  time, for large reference sets: every intermediate is [N, chunk_size]
  (or [N, chunk_size, D] for an Lp distance with p != 2) instead of [N, M],
  and the backward pass recomputes each chunk. The result equals the
  unchunked matrix (each row is normalised on its own). M need not be a
  multiple of `chunk_size`: the last chunk is padded and cut off."""
  chunk_size = int(chunk_size)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected a positive number of rows.")
  dist = resolve(distance)
  x, y = as_float(x), as_float(y)
  m = y.shape[0]
  if m <= chunk_size:
    return dist.matrix(x, y)
  chunks = -(-m // chunk_size)
  # Padding rows repeat the last one: finite, and cut off below.
  padded = jnp.concatenate([y, jnp.repeat(y[-1:], chunks * chunk_size - m, axis=0)])
  blocks = jax.lax.map(jax.checkpoint(lambda block: dist.matrix(x, block)),
                       padded.reshape(chunks, chunk_size, y.shape[1]))  # [chunks, N, chunk]
  return jnp.moveaxis(blocks, 0, 1).reshape(x.shape[0], chunks * chunk_size)[:, :m]


def dissimilarity(mat: jax.Array, *, distance: DistanceLike) -> jax.Array:
  """Map the matrix to "smaller is closer" so one code path serves all.

  For a similarity this is -s; PML's `distance.margin(ap, an)` (= an - ap for a
  similarity) then equals dis_ap - dis_an bit for bit, negation being exact.

  `mat` float [N, M]; the result has its shape and dtype.
  """
  return -mat if is_similarity(distance) else mat
