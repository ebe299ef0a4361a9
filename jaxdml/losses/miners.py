"""Miners as masks: pytorch-metric-learning 2.9.0's miners, returning [B, R]
arrays that every pair and triplet loss in jaxdml.losses takes as `mined=`.

  mined = miners.get("multi_similarity")(embeddings=E, labels=y, epsilon=0.1)
  loss, aux = losses.get("multi_similarity")(embeddings=E, labels=y, mined=mined)

A miner takes the loss's arguments (`ref_embeddings`, `ref_labels`,
`ref_valid`, `ref_self_index` as in jaxdml.losses: pass the loss the same
ones) and PML's hyperparameter names and defaults. PML returns index tuples
(pairs a1, p, a2, n or triplets a, p, n) whose length depends on the data;
here a selection is a fixed-shape `Mined`, so mining is jit-safe, and no
[B, R, R] triplet tensor is ever built. Every miner takes arrays sharded
over any mesh, Explicit axes too (`jaxdml.sharding.on_any_mesh`):

- `pos`, `neg`: how many times each (anchor, candidate) pair occurs in the
  miner's output as a pair loss sees it (PML's `convert_to_pairs`: a triplet
  miner's pairs repeat once per triplet); 0 = not mined.
- `tpos`, `tneg`: the same count over the triplets a triplet loss sees
  (PML's `convert_to_triplets`: a pair miner's pairs form, per anchor,
  every mined positive x every mined negative).
- The triplets themselves: (a, p, n) with `t_pos[a, p]`, `t_neg[a, n]` and
  lo < dis(a, n) - dis(a, p) <= hi for `window = (lo, hi)`, dis the
  miner's distance as a dissimilarity (minus the cosine similarity), each
  pos[a, p] * neg[a, n] times for a pair list (`pairs_repeat`); for a
  sampling miner, one negative `sampled_neg[a, p]` per positive pair (-1
  where none); or a list `triplets` [T, 3] (angular, from_indices).

Pair-based losses (PML's `mat_based_loss=False`: contrastive, ntxent,
tuplet_margin, lifted_structure) weigh each pair by its count, as PML's
lists repeat it; matrix-based ones (multi_similarity, supcon, circle,
generalized_lifted_structure) use the set, as PML's masks do. Distances are
PML's (`distance=`, jaxdml.losses.distances): the default "euclidean" is
`LpDistance()`, which L2-normalises the rows first.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from jaxdml import sharding
from jaxdml.losses import distances
from jaxdml.losses import pairs

STRATEGIES = ("hard", "semihard", "easy", "all")
TRIPLET_TYPES = ("all", "hard", "semihard", "easy")
_ALL = (-math.inf, math.inf)


@flax.struct.dataclass
class Mined:
  pos: jax.Array  # float [B, R] pair-loss multiplicity of (anchor, positive)
  neg: jax.Array  # float [B, R] ... of (anchor, negative)
  tpos: jax.Array  # float [B, R] number of mined triplets holding (a, p)
  tneg: jax.Array  # float [B, R] ... holding (a, n)
  t_pos: jax.Array  # bool [B, R] positives the triplets are formed from
  t_neg: jax.Array  # bool [B, R] negatives ...
  sampled_neg: jax.Array | None = None  # int [B, R]: a's negative for (a, p), or -1
  triplets: jax.Array | None = None  # int [T, 3]: listed (a, p, n), -1 = unused slot
  window: tuple = flax.struct.field(pytree_node=False, default=_ALL)
  distance: distances.Distance | None = flax.struct.field(pytree_node=False, default=None)
  # A pair list's counts: (a, p, n) then repeats pos[a, p] * neg[a, n] times.
  pairs_repeat: bool = flax.struct.field(pytree_node=False, default=False)


_NO_REFERENCE_SET = dict(ref_embeddings=None, ref_labels=None, ref_valid=None,
                         ref_self_index=None)


def _prepare(kw, name):
  return pairs.prepare(loss_name=f"miner {name}", **{**_NO_REFERENCE_SET, **kw})


def _prepared(kw, name, distance):
  p = _prepare(kw, name)
  mat = jax.lax.stop_gradient(distances.pairwise(p.query, p.ref, distance=distance))
  return p, mat, distances.dissimilarity(mat, distance=distance)


def _sorted_keys(dis, mask):
  return jnp.sort(jnp.where(mask, dis, jnp.inf), axis=1)


def window_counts(dis: jax.Array, t_pos: jax.Array, t_neg: jax.Array,
                  window: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
  """Per (a, p): the negatives n with lo < dis_an - dis_ap <= hi; per
  (a, n): the positives with the same. O(B R log R) time, [B, R] memory.

  `dis` float [B, R], `t_pos`, `t_neg` bool [B, R]; two float32 [B, R] counts.
  """
  lo, hi = window
  search = lambda keys, q, side: jax.vmap(functools.partial(jnp.searchsorted, side=side))(keys, q)
  neg_keys, pos_keys = _sorted_keys(dis, t_neg), _sorted_keys(dis, t_pos)
  n_neg = jnp.sum(t_neg, axis=1, keepdims=True)
  per_pos = (jnp.minimum(search(neg_keys, dis + hi, "right"), n_neg)
             - jnp.minimum(search(neg_keys, dis + lo, "right"), n_neg))
  # dis_an - hi <= dis_ap < dis_an - lo
  per_neg = search(pos_keys, dis - lo, "left") - search(pos_keys, dis - hi, "left")
  return (jnp.where(t_pos, jnp.maximum(per_pos, 0), 0).astype(jnp.float32),
          jnp.where(t_neg, jnp.maximum(per_neg, 0), 0).astype(jnp.float32))


def from_pairs(pos: jax.Array, neg: jax.Array) -> Mined:
  """A pair miner's selection from [B, R] masks or counts (how many times
  each pair is listed); triplets per anchor are its listed positives x its
  listed negatives, as PML's `convert_to_triplets`.

  `pos`, `neg`: bool masks or float counts, [B, R] each.
  """
  pos_f, neg_f = pos.astype(jnp.float32), neg.astype(jnp.float32)
  tpos = pos_f * jnp.sum(neg_f, axis=1, keepdims=True)
  tneg = neg_f * jnp.sum(pos_f, axis=1, keepdims=True)
  return Mined(pos=pos_f, neg=neg_f, tpos=tpos, tneg=tneg, t_pos=pos_f > 0, t_neg=neg_f > 0,
               pairs_repeat=True)


def _from_triplets(t_pos, t_neg, dis, window, distance):
  tpos, tneg = window_counts(dis, t_pos, t_neg, window)
  return Mined(pos=tpos, neg=tneg, tpos=tpos, tneg=tneg, t_pos=t_pos, t_neg=t_neg,
               window=tuple(float(w) for w in window), distance=distances.resolve(distance))


def _pick(dis, mask, hardest_largest):
  """Per row the index of the largest (or smallest) `dis` under `mask`, and
  whether the row has any; the first index on ties, as torch.max/min."""
  fill = -jnp.inf if hardest_largest else jnp.inf
  masked = jnp.where(mask, dis, fill)
  idx = jnp.argmax(masked, axis=1) if hardest_largest else jnp.argmin(masked, axis=1)
  return idx, jnp.any(mask, axis=1), jnp.take_along_axis(masked, idx[:, None], axis=1)


def _in_range(mat, allowed):
  return True if allowed is None else (mat >= allowed[0]) & (mat <= allowed[1])


@sharding.on_any_mesh
def batch_easy_hard(*, embeddings: jax.Array, labels: jax.Array,
                    ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                    ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                    pos_strategy: str = "easy", neg_strategy: str = "semihard",
                    allowed_pos_range: tuple[float, float] | None = None,
                    allowed_neg_range: tuple[float, float] | None = None,
                    distance: distances.DistanceLike = "euclidean") -> Mined:
  """PML's `BatchEasyHardMiner`: per anchor one positive and one negative
  chosen by strategy ("hard": the farthest positive / closest negative,
  "easy": the reverse, "semihard": the hard one on the right side of the
  other pair, "all": every pair). `allowed_*_range` = (min, max) of the
  distance (or similarity) a pair may have. Allocates [B, R].

  Shapes: `embeddings` float [B, D], `labels` int [B]; the selection's masks are bool [B, R].
  """
  for which, s in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
    if s not in STRATEGIES:
      raise ValueError(f"{which}={s!r}: expected one of {STRATEGIES}.")
  if pos_strategy == neg_strategy == "semihard":
    raise ValueError('pos_strategy and neg_strategy cannot both be "semihard".')
  if "semihard" in (pos_strategy, neg_strategy) and "all" in (pos_strategy, neg_strategy):
    raise ValueError('"semihard" cannot be used in combination with "all".')
  kw = dict(embeddings=embeddings, labels=labels, ref_embeddings=ref_embeddings,
            ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index)
  p, mat, dis = _prepared(kw, "batch_easy_hard", distance)
  pos_ok = p.pos & _in_range(mat, allowed_pos_range)
  neg_ok = p.neg & _in_range(mat, allowed_neg_range)
  # In dissimilarity terms a hard positive is the largest, a hard negative
  # the smallest; "semihard" picks like "hard", past the other pair.
  pick_pos = lambda mask: _pick(dis, mask, pos_strategy != "easy")
  pick_neg = lambda mask: _pick(dis, mask, neg_strategy == "easy")
  if pos_strategy == "semihard":
    n_idx, n_keep, n_dis = pick_neg(neg_ok)
    p_idx, p_keep, _ = pick_pos(pos_ok & (dis < n_dis))
  elif neg_strategy == "semihard":
    p_idx, p_keep, p_dis = pick_pos(pos_ok)
    n_idx, n_keep, _ = pick_neg(neg_ok & (dis > p_dis))
  else:
    p_idx, p_keep, _ = pick_pos(pos_ok)
    n_idx, n_keep, _ = pick_neg(neg_ok)
  one_hot = lambda idx, keep: jax.nn.one_hot(idx, dis.shape[1], dtype=bool) & keep[:, None]
  if "all" not in (pos_strategy, neg_strategy):
    keep = p_keep & n_keep
    pos, neg = one_hot(p_idx, keep), one_hot(n_idx, keep)
  else:
    pos = p.pos if pos_strategy == "all" else one_hot(p_idx, p_keep)
    neg = p.neg if neg_strategy == "all" else one_hot(n_idx, n_keep)
  return from_pairs(pos, neg)


@sharding.on_any_mesh
def batch_hard(*, allowed_pos_range: tuple[float, float] | None = None,
               allowed_neg_range: tuple[float, float] | None = None,
               distance: distances.DistanceLike = "euclidean", **kw: Any) -> Mined:
  """PML's `BatchHardMiner`: per anchor its farthest positive and closest
  negative, one triplet per anchor that has both."""
  return batch_easy_hard(pos_strategy="hard", neg_strategy="hard",
                         allowed_pos_range=allowed_pos_range,
                         allowed_neg_range=allowed_neg_range, distance=distance, **kw)


@sharding.on_any_mesh
def pair_margin(*, pos_margin: float = 0.2, neg_margin: float = 0.8,
                distance: distances.DistanceLike = "euclidean", **kw: Any) -> Mined:
  """PML's `PairMarginMiner`: positives farther than `pos_margin`, negatives
  closer than `neg_margin` (for a similarity: less / more similar)."""
  p, mat, _ = _prepared(kw, "pair_margin", distance)
  if distances.is_similarity(distance):
    return from_pairs(p.pos & (mat < pos_margin), p.neg & (mat > neg_margin))
  return from_pairs(p.pos & (mat > pos_margin), p.neg & (mat < neg_margin))


@sharding.on_any_mesh
def triplet_margin(*, margin: float = 0.2, type_of_triplets: str = "all",
                   distance: distances.DistanceLike = "euclidean", **kw: Any) -> Mined:
  """PML's `TripletMarginMiner`: with m = dis(a, n) - dis(a, p), the
  triplets with m <= margin ("all"), also m <= 0 ("hard"), also m > 0
  ("semihard"), or m > margin ("easy"). Counted by sorting, never built."""
  if type_of_triplets not in TRIPLET_TYPES:
    raise ValueError(f"type_of_triplets={type_of_triplets!r}: expected one of {TRIPLET_TYPES}.")
  p, _, dis = _prepared(kw, "triplet_margin", distance)
  window = {"all": (-math.inf, margin), "hard": (-math.inf, min(margin, 0.0)),
            "semihard": (0.0, margin), "easy": (margin, math.inf)}[type_of_triplets]
  return _from_triplets(p.pos, p.neg, dis, window, distance)


@sharding.on_any_mesh
def multi_similarity(*, epsilon: float = 0.1, distance: distances.DistanceLike = "cosine",
                     **kw: Any) -> Mined:
  """PML's `MultiSimilarityMiner`: a positive is kept when it is less similar
  than the anchor's most similar negative plus epsilon, a negative when it
  is more similar than the least similar positive minus epsilon; nothing
  when the batch has no positive or no negative pair."""
  p, _, dis = _prepared(kw, "multi_similarity", distance)
  return from_pairs(*multi_similarity_select(dis, p.pos, p.neg, epsilon))


def multi_similarity_select(dis: jax.Array, pos: jax.Array, neg: jax.Array,
                            epsilon: float) -> tuple[jax.Array, jax.Array]:
  """The MS miner's (pos, neg) masks on a [B, R] dissimilarity.

  `dis` float [B, R], `pos`, `neg` bool [B, R]; returns bool [B, R] masks.
  """
  dis = jax.lax.stop_gradient(dis)
  min_neg = jnp.min(jnp.where(neg, dis, jnp.inf), axis=1, keepdims=True)
  max_pos = jnp.max(jnp.where(pos, dis, -jnp.inf), axis=1, keepdims=True)
  any_pairs = jnp.any(pos) & jnp.any(neg)
  return (pos & (dis + epsilon > min_neg) & any_pairs,
          neg & (dis - epsilon < max_pos) & any_pairs)


@sharding.on_any_mesh
def distance_weighted_probabilities(*, embeddings: jax.Array, labels: jax.Array,
                                    ref_embeddings: jax.Array | None = None,
                                    ref_labels: jax.Array | None = None,
                                    ref_valid: jax.Array | None = None,
                                    ref_self_index: jax.Array | None = None, cutoff: float = 0.5,
                                    nonzero_loss_cutoff: float = 1.4) -> jax.Array:
  """PML's `DistanceWeightedMiner` sampling distribution over each anchor's
  negatives (Wu et al. 2017: the inverse of the density of distances on
  the unit sphere, cut at `cutoff`, zero past `nonzero_loss_cutoff`);
  [B, R], rows sum to 1, or 0 where no negative qualifies.

  Shapes: `embeddings` float [B, D], `labels` int [B]; the result float32 [B, R].
  """
  kw = dict(embeddings=distances.l2_normalize(distances.as_float(embeddings)), labels=labels,
            ref_embeddings=(None if ref_embeddings is None else
                            distances.l2_normalize(distances.as_float(ref_embeddings))),
            ref_labels=ref_labels, ref_valid=ref_valid, ref_self_index=ref_self_index)
  p, mat, _ = _prepared(kw, "distance_weighted", "euclidean")
  d = float(p.query.shape[1])
  mat = jnp.maximum(mat, cutoff)
  log_w = (2.0 - d) * jnp.log(mat) - ((d - 3.0) / 2.0) * jnp.log(1.0 - 0.25 * mat * mat)
  bad = ~jnp.isfinite(log_w)
  log_w = jnp.where(p.neg, log_w, 0.0)  # PML zeroes the other rows' logs, not -inf
  top = jnp.max(jnp.where(bad, -jnp.inf, log_w))  # one shift for the whole matrix, as PML
  w = jnp.where(p.neg & ~bad & (mat < nonzero_loss_cutoff), jnp.exp(log_w - top), 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


@sharding.on_any_mesh
def distance_weighted(*, rng: jax.Array, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4,
                      **kw: Any) -> Mined:
  """PML's `DistanceWeightedMiner`: triplets whose negative is drawn from
  `distance_weighted_probabilities`. PML draws n_p random positives (with
  replacement) per anchor and a negative for each; here every positive
  pair gets one negative (the same distribution over negatives, without
  the positives' sampling noise). Inverse-CDF sampling, [B, R] memory.

  `rng`: a jax.random key; `kw`: the loss's arrays (`embeddings` float [B, D], `labels` int [B],
  reference set).
  """
  prob = distance_weighted_probabilities(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff,
                                         **kw)
  p = _prepare(kw, "distance_weighted")
  cdf = jnp.cumsum(prob, axis=1)
  u = jax.random.uniform(rng, p.pos.shape) * cdf[:, -1:]
  drawn = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(cdf, u)
  drawn = jnp.minimum(drawn, prob.shape[1] - 1)
  ok = p.pos & (cdf[:, -1:] > 0)
  sampled = jnp.where(ok, drawn, -1)
  rows = jnp.broadcast_to(jnp.arange(prob.shape[0])[:, None], drawn.shape)
  tneg = jnp.zeros(prob.shape).at[rows, jnp.where(ok, drawn, prob.shape[1])].add(
      1.0, mode="drop")
  tpos = ok.astype(jnp.float32)
  return Mined(pos=tpos, neg=tneg, tpos=tpos, tneg=tneg, t_pos=ok, t_neg=tneg > 0,
               sampled_neg=sampled, distance="euclidean")


def _check_shape(shape):
  shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
  if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
    raise ValueError(f"shape={shape!r}: expected (num_anchors, num_candidates), the "
                     "[B, R] of the loss's pairs (R = B without a reference set).")
  return shape


def _listed_counts(rows, cols, shape):
  """[B, R]: how many times each (row, col) is listed; -1 (out of range): never."""
  ok = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
  flat = jnp.where(ok, rows * shape[1] + cols, shape[0] * shape[1])
  return jnp.zeros(shape[0] * shape[1]).at[flat].add(1.0, mode="drop").reshape(shape)


@sharding.on_any_mesh
def from_triplets(triplets: jax.Array, *, shape: tuple[int, int]) -> Mined:
  """Listed triplets, int [T, 3] rows (a, p, n) into anchors and reference
  set (the batch without one), -1 (out of range) in unused slots, as a
  selection of `shape` (B, R): pair losses see (a, p) and (a, n) once per
  triplet, triplet losses the list (PML's convert_to_pairs/_triplets)."""
  shape = _check_shape(shape)
  triplets = jnp.asarray(triplets)
  if (triplets.ndim != 2 or triplets.shape[1] != 3
      or not jnp.issubdtype(triplets.dtype, jnp.integer)):
    raise ValueError(f"triplets must be int [T, 3] rows (a, p, n), got {triplets.dtype} "
                     f"{triplets.shape}; PML's tuple (a, p, n) is jnp.stack([a, p, n], 1).")
  in_range = jnp.all((triplets >= 0) & (triplets < jnp.array([*shape, shape[1]])), axis=1)
  triplets = jnp.where(in_range[:, None], triplets, -1).astype(jnp.int32)
  ap = _listed_counts(triplets[:, 0], triplets[:, 1], shape)
  an = _listed_counts(triplets[:, 0], triplets[:, 2], shape)
  return Mined(pos=ap, neg=an, tpos=ap, tneg=an, t_pos=ap > 0, t_neg=an > 0,
               triplets=triplets)


@sharding.on_any_mesh
def from_indices(indices: tuple, *, shape: tuple[int, int]) -> Mined:
  """PML's index tuple, pairs (a1, p, a2, n) or triplets (a, p, n) as 1-D int
  arrays with -1 in unused slots (static lengths under jit), as a selection
  of `shape` (B, R); a pair listed twice counts twice. Losses keep the pairs
  the labels allow (PML takes them as given: the same if labels agree)."""
  indices = tuple(jnp.asarray(i) for i in indices)
  if len(indices) not in (3, 4) or any(
      i.ndim != 1 or not jnp.issubdtype(i.dtype, jnp.integer) for i in indices):
    raise ValueError("indices must be PML's (a1, p, a2, n) or (a, p, n): 1-D int arrays, "
                     f"-1 for an unused slot; got {[(i.dtype, i.shape) for i in indices]}.")
  lists = [indices] if len(indices) == 3 else [indices[:2], indices[2:]]
  if any(len({i.shape[0] for i in group}) > 1 for group in lists):
    raise ValueError(f"indices of one list must be one length: {[len(i) for i in indices]}.")
  if len(indices) == 3:
    return from_triplets(jnp.stack(indices, axis=1), shape=shape)
  shape = _check_shape(shape)
  return from_pairs(_listed_counts(*indices[:2], shape), _listed_counts(*indices[2:], shape))


@sharding.on_any_mesh
def already_packaged_as_triplets(*, embeddings: jax.Array, labels: jax.Array | None = None,
                                 ref_embeddings: jax.Array | None = None,
                                 ref_labels: jax.Array | None = None,
                                 ref_valid: jax.Array | None = None,
                                 ref_self_index: jax.Array | None = None) -> Mined:
  """PML's `EmbeddingsAlreadyPackagedAsTriplets`: rows 3i, 3i + 1, 3i + 2 are a
  triplet (a, p, n), in-batch, B a multiple of 3. Losses still read the
  labels: give a and p one label and n another (PML takes the rows as given).

  `embeddings` float [3T, D]; `labels` int [3T] or None.
  """
  del labels
  if any(r is not None for r in (ref_embeddings, ref_labels, ref_valid, ref_self_index)):
    raise ValueError("already_packaged_as_triplets mines the batch; drop the reference set.")
  b = jnp.shape(embeddings)[0]
  if b % 3:
    raise ValueError(f"already_packaged_as_triplets: {b} rows are not whole (a, p, n) "
                     "triplets; make the batch a multiple of 3.")
  return from_triplets(jnp.arange(b).reshape(-1, 3), shape=(b, b))


@sharding.on_any_mesh
def angular(*, angle: float = 20, **kw: Any) -> Mined:
  """PML's `AngularMiner`: the triplets (a, p, n) whose angle at n,
  atan(||a - p|| / (2 ||n - (a + p) / 2||)), exceeds `angle` degrees, on the
  raw rows as PML's (its `pairwise_distance` does not normalise; torch adds
  1e-6 to the difference). Every triplet is tested, as in PML: [B, R, R]
  time and memory, and the list takes [B * R * R, 3] ints."""
  p = _prepare(kw, "angular")
  q, r = jax.lax.stop_gradient(p.query), jax.lax.stop_gradient(p.ref)
  shifted = r + 1e-6  # torch's pairwise_distance adds its eps to x1 - x2
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  ap = distances.safe_sqrt(distances.squared_euclidean_matrix(q + 1e-6, r))  # [a, p]
  # ||(n + eps) - (a + p) / 2||^2 from inner products: no [B, R, R, D] tensor.
  centre_sq = (jnp.sum(q * q, 1)[:, None] + 2.0 * dot(q, r.T) + jnp.sum(r * r, 1)) / 4.0
  nc_sq = (jnp.sum(shifted * shifted, 1) - dot(q, shifted.T)[:, None, :]
           - dot(r, shifted.T)[None, :, :] + centre_sq[:, :, None])  # [a, p, n]
  nc = distances.safe_sqrt(jnp.maximum(nc_sq, 0.0))
  wide = jnp.arctan(ap[:, :, None] / (2.0 * nc)) > math.radians(angle)
  keep = p.pos[:, :, None] & p.neg[:, None, :] & wide
  return from_triplets(jnp.argwhere(keep, size=keep.size, fill_value=-1), shape=p.pos.shape)


def ceil_like_python(count: jax.Array, fraction: float) -> jax.Array:
  """math.ceil(fraction * count), the product rounded to float64 first as in
  Python, for int counts in [0, 2**31) and a static fraction in [0, 1].
  jit has no float64 and float32 rounds otherwise (0.3 * 50: 15.0 in
  float64, 15.000001 in float32): exact products on 16-bit limbs."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction={fraction}: expected 0 <= fraction <= 1.")
  count = jnp.asarray(count).astype(jnp.uint32)
  mant, denom = float(fraction).as_integer_ratio()  # fraction = mant / 2**shift
  shift = denom.bit_length() - 1
  limbs = [jnp.zeros_like(count) for _ in range(7)]  # mant * count, base 2**16
  for i in range(4):
    for j, part in enumerate((count & 0xFFFF, count >> 16)):
      prod = part * jnp.uint32((mant >> (16 * i)) & 0xFFFF)
      limbs[i + j] = limbs[i + j] + (prod & 0xFFFF)
      limbs[i + j + 1] = limbs[i + j + 1] + (prod >> 16)
  whole, carry = jnp.zeros_like(count), jnp.zeros_like(count)  # whole: the integer part
  top_bit, ones = jnp.full(count.shape, -1), jnp.zeros(count.shape, jnp.int32)  # of the rest
  for k, limb in enumerate(limbs):
    digit, carry, low = (limb + carry) & 0xFFFF, (limb + carry) >> 16, 16 * k
    if low >= shift:
      whole = whole | (digit << (low - shift)) if low - shift < 32 else whole
      continue
    if low + 16 > shift:
      whole, digit = whole | (digit >> (shift - low)), digit & ((1 << (shift - low)) - 1)
    top_bit = jnp.where(digit > 0, low + 31 - jax.lax.clz(digit).astype(jnp.int32), top_bit)
    ones = ones + jax.lax.population_count(digit).astype(jnp.int32)
  # float64 rounds whole + rest down to whole when rest <= half an ulp of
  # whole, 2**half_ulp (a tie goes to whole, the even one).
  half_ulp = shift + 31 - jax.lax.clz(whole).astype(jnp.int32) - 53
  rounds_down = (whole >= 1) & ((top_bit < half_ulp) | ((top_bit == half_ulp) & (ones == 1)))
  return whole.astype(jnp.int32) + ((ones > 0) & ~rounds_down).astype(jnp.int32)


def _hardest_share(dis, counts, fraction, largest):
  """The hardest ceil(fraction * n) of the n listed pairs (counts [B, R]),
  by `dis`, largest or smallest first, ties to the lower flat index."""
  counts = jnp.round(counts).astype(jnp.int32).reshape(-1)
  key = (-dis if largest else dis).reshape(-1)
  order = jnp.argsort(jnp.where(counts > 0, key, jnp.inf), stable=True)
  sorted_counts = counts[order]
  before = jnp.cumsum(sorted_counts) - sorted_counts
  k = ceil_like_python(jnp.sum(counts), fraction)
  kept = jnp.clip(k - before, 0, sorted_counts)
  return jnp.zeros_like(counts).at[order].set(kept).reshape(dis.shape)


@sharding.on_any_mesh
def hdc(*, filter_percentage: float = 0.5, distance: distances.DistanceLike = "euclidean",
        mined: Mined | None = None, **kw: Any) -> Mined:
  """PML's `HDCMiner` (hard-aware deeply cascaded): the farthest
  ceil(filter_percentage * n) of the n positive pairs, the closest share of
  the negatives. Cascade with `mined=` (PML's `set_idx_externally`): the
  candidates are then its pairs, repeats included, as `hdc(mined=hdc(...))`.
  Ties go to the lower (anchor, candidate); torch.topk's order is unset."""
  if not 0.0 <= filter_percentage <= 1.0:
    raise ValueError(f"filter_percentage={filter_percentage}: expected a share in [0, 1].")
  p, _, dis = _prepared(kw, "hdc", distance)
  pos, neg = p.pos.astype(jnp.float32), p.neg.astype(jnp.float32)
  if mined is not None:
    _, _, pos, neg = restrict(p, mined)
  return from_pairs(_hardest_share(dis, pos, filter_percentage, largest=True),
                    _hardest_share(dis, neg, filter_percentage, largest=False))


def _uniform_over_bins(rng, mat, mask, num_bins, per_bin):
  """[B, R] counts: `per_bin` draws (with replacement) from each non-empty
  bin of `num_bins` equal bins spanning the masked values of `mat`."""
  flat, ok = mat.reshape(-1), mask.reshape(-1)
  edges = jnp.linspace(jnp.min(jnp.where(ok, flat, jnp.inf)),
                       jnp.max(jnp.where(ok, flat, -jnp.inf)), num_bins + 1)
  # Bin i holds edges[i] <= x < edges[i + 1]; the last one also its end.
  bin_of = jnp.where(ok, jnp.searchsorted(edges[1:-1], flat, side="right"), num_bins)
  order = jnp.argsort(bin_of, stable=True)
  in_bin = jnp.bincount(bin_of, length=num_bins + 1)[:num_bins]
  start = jnp.cumsum(in_bin) - in_bin
  draw = jax.random.randint(rng, (num_bins, per_bin), 0, jnp.maximum(in_bin, 1)[:, None])
  chosen = jnp.where(in_bin[:, None] > 0, order[start[:, None] + draw], flat.size)
  return jnp.zeros(flat.size).at[chosen.reshape(-1)].add(1.0, mode="drop").reshape(mat.shape)


@sharding.on_any_mesh
def uniform_histogram(*, rng: jax.Array, num_bins: int = 100, pos_per_bin: int = 10,
                      neg_per_bin: int = 10, distance: distances.DistanceLike = "euclidean",
                      **kw: Any) -> Mined:
  """PML's `UniformHistogramMiner`: the positive pairs' distances (or
  similarities) are cut into `num_bins` equal bins between their min and
  max, and `pos_per_bin` pairs are drawn uniformly, with replacement, from
  each non-empty bin; the same for the negatives. A pair drawn twice counts
  twice. `rng`: a jax.random key. O(B R log(B R)) time, [B, R] memory."""
  p, mat, _ = _prepared(kw, "uniform_histogram", distance)
  pos_rng, neg_rng = jax.random.split(rng)
  return from_pairs(_uniform_over_bins(pos_rng, mat, p.pos, num_bins, pos_per_bin),
                    _uniform_over_bins(neg_rng, mat, p.neg, num_bins, neg_per_bin))


_MINERS = {"batch_easy_hard": batch_easy_hard, "batch_hard": batch_hard,
           "pair_margin": pair_margin, "triplet_margin": triplet_margin,
           "multi_similarity": multi_similarity, "distance_weighted": distance_weighted,
           "angular": angular, "hdc": hdc, "uniform_histogram": uniform_histogram,
           "already_packaged_as_triplets": already_packaged_as_triplets}
SAMPLING = ("distance_weighted", "uniform_histogram")  # they take an rng: not with_miner


def names() -> tuple[str, ...]:
  """Sorted names of the registered miners."""
  return tuple(sorted(_MINERS))


def get(name: str) -> Callable[..., Mined]:
  """The miner registered under `name`; ValueError naming the miners."""
  if name not in _MINERS:
    raise ValueError(f"Unknown miner {name!r}; miners: {', '.join(names())}.")
  return _MINERS[name]


def restrict(p: pairs.Pairs, mined: Mined) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`Pairs` p narrowed to a miner's selection, with its pair weights:
  (pos mask, neg mask, pos weights, neg weights).

  `pos`, `neg` bool [B, R]; the weights float [B, R].
  """
  if mined is None:
    return p.pos, p.neg, p.pos.astype(jnp.float32), p.neg.astype(jnp.float32)
  if mined.pos.shape != p.pos.shape:
    raise ValueError(f"mined selection is {mined.pos.shape} but the loss's pairs are "
                     f"{p.pos.shape}: mine with the same embeddings and reference set.")
  pos_w = jnp.where(p.pos, mined.pos, 0.0)
  neg_w = jnp.where(p.neg, mined.neg, 0.0)
  return pos_w > 0, neg_w > 0, pos_w, neg_w


def spec_of(miner: str | Mapping[str, Any]) -> dict:
  """A miner named or given as {"name": ..., **hparams}, as a new dict."""
  return {"name": miner} if isinstance(miner, str) else dict(miner)


def samples(miner: str | Mapping[str, Any] | Callable[..., Mined] | None) -> bool:
  """Whether the named miner draws random numbers (SAMPLING): it needs an rng."""
  return miner is not None and not callable(miner) and spec_of(miner).get("name") in SAMPLING


def with_miner(loss_fn: Callable[..., Any],
               miner: str | Mapping[str, Any] | Callable[..., Mined],
               *, rng: jax.Array | None = None) -> Callable[..., Any]:
  """`loss_fn` mining each call's pairs first: `miner` is a name, a dict
  {"name": ..., **hparams} (config.loss.miner) or a function with the
  miners' arguments. The miner sees the loss's embeddings and reference
  set, so it also works against a memory. A miner that samples (SAMPLING)
  draws from `rng`, a JAX key: a new one per call for new draws."""
  if callable(miner):
    spec, mine = {}, miner
  else:
    spec = spec_of(miner)
    name = spec.pop("name", None)
    mine = get(name)
    if name in SAMPLING:
      if rng is None:
        raise ValueError(f"miner {name!r} samples and needs an rng: pass rng= (a JAX key), "
                         f"or call jaxdml.losses.miners.{name}(rng=...) and pass mined=.")
      spec["rng"] = rng
  refs = ("embeddings", "labels", "ref_embeddings", "ref_labels", "ref_valid", "ref_self_index")

  @sharding.on_any_mesh  # a miner function of the user's too
  def mined_loss(**kwargs):
    mined = mine(**{k: kwargs[k] for k in refs if k in kwargs}, **spec)
    return loss_fn(mined=mined, **kwargs)
  return mined_loss
