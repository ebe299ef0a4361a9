"""Miners as masks: pytorch-metric-learning 2.9.0's miners, returning [B, R]
arrays that every pair and triplet loss in jaxdml.losses takes as `mined=`.

  mined = miners.get("multi_similarity")(embeddings=E, labels=y, epsilon=0.1)
  loss, aux = losses.get("multi_similarity")(embeddings=E, labels=y, mined=mined)

A miner takes the loss's arguments (`ref_embeddings`, `ref_labels`,
`ref_valid`, `ref_self_index` as in jaxdml.losses: pass the loss the same
ones) and PML's hyperparameter names and defaults. PML returns index tuples
(pairs a1, p, a2, n or triplets a, p, n) whose length depends on the data;
here a selection is a fixed-shape `Mined`, so mining is jit-safe, and no
[B, R, R] triplet tensor is ever built:

- `pos`, `neg`: how many times each (anchor, candidate) pair occurs in the
  miner's output as a pair loss sees it (PML's `convert_to_pairs`: a triplet
  miner's pairs repeat once per triplet); 0 = not mined.
- `tpos`, `tneg`: the same count over the triplets a triplet loss sees
  (PML's `convert_to_triplets`: a pair miner's pairs form, per anchor,
  every mined positive x every mined negative).
- The triplets themselves: (a, p, n) with `t_pos[a, p]`, `t_neg[a, n]` and
  lo < dis(a, n) - dis(a, p) <= hi for `window = (lo, hi)`, dis the
  miner's distance as a dissimilarity (minus the cosine similarity);
  or, for a sampling miner, one negative `sampled_neg[a, p]` per positive
  pair (-1 where none).

Pair-based losses (PML's `mat_based_loss=False`: contrastive, ntxent,
tuplet_margin, lifted_structure) weigh each pair by its count, as PML's
lists repeat it; matrix-based ones (multi_similarity, supcon, circle,
generalized_lifted_structure) use the set, as PML's masks do. Distances are
PML's (`distance=`, jaxdml.losses.distances): the default "euclidean" is
`LpDistance()`, which L2-normalises the rows first.
"""
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

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
  window: tuple = flax.struct.field(pytree_node=False, default=_ALL)
  distance: distances.Distance | None = flax.struct.field(pytree_node=False, default=None)


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


def window_counts(dis, t_pos, t_neg, window):
  """Per (a, p): the negatives n with lo < dis_an - dis_ap <= hi; per
  (a, n): the positives with the same. O(B R log R) time, [B, R] memory."""
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


def from_pairs(pos, neg):
  """A pair miner's selection: each pair once; triplets per anchor are its
  mined positives x its mined negatives."""
  pos_f, neg_f = pos.astype(jnp.float32), neg.astype(jnp.float32)
  tpos = pos_f * jnp.sum(neg_f, axis=1, keepdims=True)
  tneg = neg_f * jnp.sum(pos_f, axis=1, keepdims=True)
  return Mined(pos=pos_f, neg=neg_f, tpos=tpos, tneg=tneg, t_pos=pos, t_neg=neg)


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


def batch_easy_hard(*, embeddings, labels, ref_embeddings=None, ref_labels=None,
                    ref_valid=None, ref_self_index=None, pos_strategy="easy",
                    neg_strategy="semihard", allowed_pos_range=None, allowed_neg_range=None,
                    distance="euclidean"):
  """PML's `BatchEasyHardMiner`: per anchor one positive and one negative
  chosen by strategy ("hard": the farthest positive / closest negative,
  "easy": the reverse, "semihard": the hard one on the right side of the
  other pair, "all": every pair). `allowed_*_range` = (min, max) of the
  distance (or similarity) a pair may have. Allocates [B, R]."""
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


def batch_hard(*, allowed_pos_range=None, allowed_neg_range=None, distance="euclidean", **kw):
  """PML's `BatchHardMiner`: per anchor its farthest positive and closest
  negative, one triplet per anchor that has both."""
  return batch_easy_hard(pos_strategy="hard", neg_strategy="hard",
                         allowed_pos_range=allowed_pos_range,
                         allowed_neg_range=allowed_neg_range, distance=distance, **kw)


def pair_margin(*, pos_margin=0.2, neg_margin=0.8, distance="euclidean", **kw):
  """PML's `PairMarginMiner`: positives farther than `pos_margin`, negatives
  closer than `neg_margin` (for a similarity: less / more similar)."""
  p, mat, _ = _prepared(kw, "pair_margin", distance)
  if distances.is_similarity(distance):
    return from_pairs(p.pos & (mat < pos_margin), p.neg & (mat > neg_margin))
  return from_pairs(p.pos & (mat > pos_margin), p.neg & (mat < neg_margin))


def triplet_margin(*, margin=0.2, type_of_triplets="all", distance="euclidean", **kw):
  """PML's `TripletMarginMiner`: with m = dis(a, n) - dis(a, p), the
  triplets with m <= margin ("all"), also m <= 0 ("hard"), also m > 0
  ("semihard"), or m > margin ("easy"). Counted by sorting, never built."""
  if type_of_triplets not in TRIPLET_TYPES:
    raise ValueError(f"type_of_triplets={type_of_triplets!r}: expected one of {TRIPLET_TYPES}.")
  p, _, dis = _prepared(kw, "triplet_margin", distance)
  window = {"all": (-math.inf, margin), "hard": (-math.inf, min(margin, 0.0)),
            "semihard": (0.0, margin), "easy": (margin, math.inf)}[type_of_triplets]
  return _from_triplets(p.pos, p.neg, dis, window, distance)


def multi_similarity(*, epsilon=0.1, distance="cosine", **kw):
  """PML's `MultiSimilarityMiner`: a positive is kept when it is less similar
  than the anchor's most similar negative plus epsilon, a negative when it
  is more similar than the least similar positive minus epsilon; nothing
  when the batch has no positive or no negative pair."""
  p, _, dis = _prepared(kw, "multi_similarity", distance)
  return from_pairs(*multi_similarity_select(dis, p.pos, p.neg, epsilon))


def multi_similarity_select(dis, pos, neg, epsilon):
  """The MS miner's (pos, neg) masks on a [B, R] dissimilarity."""
  dis = jax.lax.stop_gradient(dis)
  min_neg = jnp.min(jnp.where(neg, dis, jnp.inf), axis=1, keepdims=True)
  max_pos = jnp.max(jnp.where(pos, dis, -jnp.inf), axis=1, keepdims=True)
  any_pairs = jnp.any(pos) & jnp.any(neg)
  return (pos & (dis + epsilon > min_neg) & any_pairs,
          neg & (dis - epsilon < max_pos) & any_pairs)


def distance_weighted_probabilities(*, embeddings, labels, ref_embeddings=None,
                                    ref_labels=None, ref_valid=None, ref_self_index=None,
                                    cutoff=0.5, nonzero_loss_cutoff=1.4):
  """PML's `DistanceWeightedMiner` sampling distribution over each anchor's
  negatives (Wu et al. 2017: the inverse of the density of distances on
  the unit sphere, cut at `cutoff`, zero past `nonzero_loss_cutoff`);
  [B, R], rows sum to 1, or 0 where no negative qualifies."""
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


def distance_weighted(*, rng, cutoff=0.5, nonzero_loss_cutoff=1.4, **kw):
  """PML's `DistanceWeightedMiner`: triplets whose negative is drawn from
  `distance_weighted_probabilities`. PML draws n_p random positives (with
  replacement) per anchor and a negative for each; here every positive
  pair gets one negative (the same distribution over negatives, without
  the positives' sampling noise). Inverse-CDF sampling, [B, R] memory."""
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


_MINERS = {"batch_easy_hard": batch_easy_hard, "batch_hard": batch_hard,
           "pair_margin": pair_margin, "triplet_margin": triplet_margin,
           "multi_similarity": multi_similarity, "distance_weighted": distance_weighted}


def names():
  return tuple(sorted(_MINERS))


def get(name):
  """The miner registered under `name`; ValueError naming the miners."""
  if name not in _MINERS:
    raise ValueError(f"Unknown miner {name!r}; miners: {', '.join(names())}.")
  return _MINERS[name]


def restrict(p, mined):
  """`Pairs` p narrowed to a miner's selection, with its pair weights:
  (pos mask, neg mask, pos weights, neg weights)."""
  if mined is None:
    return p.pos, p.neg, p.pos.astype(jnp.float32), p.neg.astype(jnp.float32)
  if mined.pos.shape != p.pos.shape:
    raise ValueError(f"mined selection is {mined.pos.shape} but the loss's pairs are "
                     f"{p.pos.shape}: mine with the same embeddings and reference set.")
  pos_w = jnp.where(p.pos, mined.pos, 0.0)
  neg_w = jnp.where(p.neg, mined.neg, 0.0)
  return pos_w > 0, neg_w > 0, pos_w, neg_w


def with_miner(loss_fn, miner):
  """`loss_fn` mining each call's pairs first: `miner` is a name or a dict
  {"name": ..., **hparams} (config.loss.miner). The miner sees the loss's
  embeddings and reference set, so it also works against a memory."""
  spec = {"name": miner} if isinstance(miner, str) else dict(miner)
  name = spec.pop("name", None)
  mine = get(name)
  if name == "distance_weighted":
    raise ValueError("miner 'distance_weighted' samples and needs an rng; call "
                     "jaxdml.losses.miners.distance_weighted(rng=...) and pass mined=.")
  refs = ("embeddings", "labels", "ref_embeddings", "ref_labels", "ref_valid", "ref_self_index")

  def mined_loss(**kwargs):
    mined = mine(**{k: kwargs[k] for k in refs if k in kwargs}, **spec)
    return loss_fn(mined=mined, **kwargs)
  return mined_loss
