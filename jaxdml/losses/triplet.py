"""Triplet margin loss with PML's batch-all, batch-hard and semi-hard mining.

`hinge = [dis(a, p) - dis(a, n) + margin]_+` with dis the distance (or minus
the cosine similarity). Mining and reduction reproduce pytorch-metric-learning
2.9.0 so values compare directly:
- "all": every valid (a, p, n), PML `TripletMarginLoss()`.
- "hard": per anchor its farthest positive and closest negative, anchors
  lacking either are dropped; PML `BatchHardMiner` feeding the loss. Ties pick
  the first index, as torch.max/min on CPU.
- "semihard": the triplets with 0 < dis(a, n) - dis(a, p) <= margin; PML
  `TripletMarginMiner(margin, type_of_triplets="semihard")` feeding
  `TripletMarginLoss(margin)`.
The default reduction is PML's AvgNonZeroReducer (mean over triplets with a
positive hinge); "mean" averages over all mined triplets.

A miner's selection (`mined=`, jaxdml.losses.miners) replaces `mining`:
its triplets are its positives x negatives within its window on
dis(a, n) - dis(a, p) (a pair miner's: each pos[a, p] * neg[a, n] times,
as PML's `convert_to_triplets` repeats listed pairs), one sampled negative
per positive pair, or its list of triplets (`mined.triplets`).

For "all", "semihard" and mined windows the [B, R, R] triplet tensor is
never built: per anchor the negatives are sorted once and, for every
positive, the active negatives form a contiguous run whose hinge sum is read
off prefix sums. Cost O(B R log R) time and O(B R) memory, so a cross-batch
memory of 50k entries is as cheap as a batch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import miners
from jaxdml.losses import pairs
from jaxdml.losses import reducers

MININGS = ("all", "hard", "semihard")


def check_mining(mining: str) -> None:
  """ValueError naming the choices unless `mining` is one of MININGS."""
  if mining not in MININGS:
    raise ValueError(
        f"mining={mining!r} is not supported; use one of {MININGS}.")


def _hard(dis, pos, neg, weight, margin, reduction):
  p_idx = jnp.argmax(jnp.where(pos, dis, -jnp.inf), axis=1)
  n_idx = jnp.argmin(jnp.where(neg, dis, jnp.inf), axis=1)
  keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  take = lambda m, i: jnp.take_along_axis(m, i[:, None], axis=1)[:, 0]
  hinge = jax.nn.relu(take(dis, p_idx) - take(dis, n_idx) + margin)
  w = take(weight, n_idx)
  active = keep & (hinge > 0)
  counted = active if reduction == "avg_nonzero" else keep
  num = jnp.sum(jnp.where(keep, w * hinge, 0.0))
  den = jnp.sum(jnp.where(counted, w, 0.0))
  return num, den, pairs.count(keep), pairs.count(active)


def _sampled(dis, pos, sampled_neg, margin, reduction):
  """One triplet (a, p, sampled_neg[a, p]) per positive pair."""
  d_an = jnp.take_along_axis(dis, jnp.maximum(sampled_neg, 0), axis=1)
  hinge = jax.nn.relu(dis - d_an + margin)
  active = pos & (hinge > 0)
  counted = active if reduction == "avg_nonzero" else pos
  return (jnp.sum(jnp.where(pos, hinge, 0.0)), pairs.count(counted), pairs.count(pos),
          pairs.count(active))


def _listed(dis, pos, neg, weight, triplets, margin, reduction):
  """PML's list of triplets: int [T, 3] rows (a, p, n), -1 for an unused
  slot; a listed triplet whose pairs the labels do not allow is dropped."""
  a, p, n = (triplets[:, i] for i in range(3))
  listed = (a >= 0) & (p >= 0) & (n >= 0)
  a, p, n = (jnp.where(listed, i, 0) for i in (a, p, n))
  ok = listed & pos[a, p] & neg[a, n]
  hinge = jax.nn.relu(dis[a, p] - dis[a, n] + margin)
  w = weight[a, n]
  active = ok & (hinge > 0)
  counted = active if reduction == "avg_nonzero" else ok
  return (jnp.sum(jnp.where(ok, w * hinge, 0.0)), jnp.sum(jnp.where(counted, w, 0.0)),
          pairs.count(ok), pairs.count(active))


def _sorted_runs(dis, pos, neg, weight, margin, window, reduction, pos_count=None,
                 neg_count=None):
  """Sums over the triplets with lo < dis_an - dis_ap <= hi via sorted
  negatives; `pos_count`/`neg_count` ([B, R], 1 where None): how many
  times a pair repeats, so (a, p, n) counts pos_count * neg_count times."""
  ones = jnp.ones_like(dis)
  pos_count = ones if pos_count is None else pos_count
  neg_count = ones if neg_count is None else neg_count
  key = jax.lax.stop_gradient(jnp.where(neg, dis, jnp.inf))
  order = jnp.argsort(key, axis=1)
  key_s = jnp.take_along_axis(key, order, axis=1)
  neg_s = jnp.take_along_axis(neg, order, axis=1)
  c_s = jnp.where(neg_s, jnp.take_along_axis(neg_count, order, axis=1), 0.0)
  w_s = c_s * jnp.where(neg_s, jnp.take_along_axis(weight, order, axis=1), 0.0)
  wd_s = jnp.where(neg_s, w_s * jnp.take_along_axis(dis, order, axis=1), 0.0)
  zero = jnp.zeros_like(dis[:, :1])
  cum_c = jnp.concatenate([zero, jnp.cumsum(c_s, axis=1)], axis=1)
  cum_w = jnp.concatenate([zero, jnp.cumsum(w_s, axis=1)], axis=1)
  cum_wd = jnp.concatenate([zero, jnp.cumsum(wd_s, axis=1)], axis=1)

  # Per (anchor, positive candidate): where the negatives' run starts/ends.
  dis_ap = jax.lax.stop_gradient(dis)
  search = lambda q, side: jax.vmap(
      functools.partial(jnp.searchsorted, side=side))(key_s, q)
  n_neg = jnp.sum(neg, axis=1, keepdims=True)
  lo = jnp.minimum(search(dis_ap + window[0], "right"), n_neg)  # dis_an > dis_ap + lo
  hi_mined = jnp.clip(search(dis_ap + window[1], "right"), lo, n_neg)  # <= dis_ap + hi
  hi_active = jnp.clip(search(dis_ap + margin, "left"), lo, hi_mined)  # < dis_ap + m

  at = lambda c, i: jnp.take_along_axis(c, i, axis=1)
  w_active = at(cum_w, hi_active) - at(cum_w, lo)
  wd_active = at(cum_wd, hi_active) - at(cum_wd, lo)
  # sum over active n of w * (dis_ap + m - dis_an)
  num_ip = (dis + margin) * w_active - wd_active
  w_counted = (w_active if reduction == "avg_nonzero"
               else at(cum_w, hi_mined) - at(cum_w, lo))
  num = jnp.sum(jnp.where(pos, pos_count * num_ip, 0.0))
  den = jnp.sum(jnp.where(pos, pos_count * w_counted, 0.0))
  n_mined = jnp.sum(jnp.where(pos, pos_count * (at(cum_c, hi_mined) - at(cum_c, lo)), 0.0))
  n_active = jnp.sum(jnp.where(pos, pos_count * (at(cum_c, hi_active) - at(cum_c, lo)), 0.0))
  return num, den, n_mined, n_active


def _triplet_term(dis, pos, neg, weight, margin, mining, mined, window, repeats):
  """The mined triplets' hinges as PML lists them (a reducers.Term of kind
  "triplet"): [B] for "hard", [B, R] for a sampled negative, [T] for a list,
  else the dense [B, R, R] (a, p, n) tensor."""
  take = lambda m, i: jnp.take_along_axis(m, i[:, None], axis=1)[:, 0]
  if mined is not None and mined.triplets is not None:
    a, p, n = (mined.triplets[:, i] for i in range(3))
    listed = (a >= 0) & (p >= 0) & (n >= 0)
    a, p, n = (jnp.where(listed, i, 0) for i in (a, p, n))
    return reducers.Term(jax.nn.relu(dis[a, p] - dis[a, n] + margin), "triplet",
                         mask=listed & pos[a, p] & neg[a, n], weight=weight[a, n], anchors=a)
  if mined is not None and mined.sampled_neg is not None:
    d_an = jnp.take_along_axis(dis, jnp.maximum(mined.sampled_neg, 0), axis=1)
    return reducers.Term(jax.nn.relu(dis - d_an + margin), "triplet", mask=pos)
  if mining == "hard":
    p_idx = jnp.argmax(jnp.where(pos, dis, -jnp.inf), axis=1)
    n_idx = jnp.argmin(jnp.where(neg, dis, jnp.inf), axis=1)
    keep = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    return reducers.Term(jax.nn.relu(take(dis, p_idx) - take(dis, n_idx) + margin), "triplet",
                         mask=keep, weight=take(weight, n_idx))
  gap = dis[:, None, :] - dis[:, :, None]  # [a, p, n]: dis_an - dis_ap
  mask = (pos[:, :, None] & neg[:, None, :] & (gap > window[0]) & (gap <= window[1]))
  count = weight[:, None, :]
  if repeats:
    count = count * repeats["pos_count"][:, :, None] * repeats["neg_count"][:, None, :]
  return reducers.Term(jax.nn.relu(margin - gap), "triplet", mask=mask, weight=count)


def weighted_triplet(*, dis: jax.Array, pos: jax.Array, neg: jax.Array, weight: jax.Array,
                     margin: float, mining: str, reduction: reducers.Reduction,
                     mined: miners.Mined | None = None,
                     distance: distances.DistanceLike | None = None,
                     labels: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Shared core: sum(w * hinge) / sum(w) over the reduced set of triplets.

  `weight` is [B, R], indexed by (anchor, negative), under stop_gradient.
  With weight 1 this is PML's reduction exactly; with general weights it is
  the weighted mean, i.e. weights normalised to mean 1 over the triplets the
  reduction averages over. `mined` (with the loss's `distance`) replaces
  `mining`. Reductions other than "avg_nonzero", "mean" and "sum" (any of
  jaxdml.losses.reducers; `labels` for "class_weighted") reduce the listed
  triplets, the dense [B, R, R] tensor for "all" and "semihard".

  `dis` float [B, R], `pos`, `neg` bool [B, R]; returns (loss float scalar, aux, sum(w) float
  scalar).
  """
  check_mining(mining)
  spec = reducers.parse(reduction)
  fast = spec["name"] in ("avg_nonzero", "mean", "sum")
  reduction = spec["name"] if fast else "mean"
  weight = jax.lax.stop_gradient(weight)
  if mined is not None:
    if mining != "all":
      raise ValueError(f"mining={mining!r} and mined= both select triplets; leave "
                       "mining='all' when passing a miner's selection.")
    if (mined.window != (-math.inf, math.inf)
        and mined.distance != distances.resolve(distance)):
      raise ValueError(f"the miner's window is on distance {mined.distance} but the loss "
                       f"uses {distances.resolve(distance)}: mine with the loss's distance.")
    pos, neg = pos & mined.t_pos, neg & mined.t_neg
  repeats = {} if mined is None or not mined.pairs_repeat else dict(
      pos_count=mined.pos, neg_count=mined.neg)
  if mined is not None and mined.triplets is not None:
    num, den, n_mined, n_active = _listed(dis, pos, neg, weight, mined.triplets, margin,
                                          reduction)
  elif mined is not None and mined.sampled_neg is not None:
    num, den, n_mined, n_active = _sampled(dis, pos, mined.sampled_neg, margin, reduction)
  elif mining == "hard":
    num, den, n_mined, n_active = _hard(dis, pos, neg, weight, margin,
                                        reduction)
  else:
    window = {"all": (-math.inf, math.inf), "semihard": (0.0, margin)}[mining]
    num, den, n_mined, n_active = _sorted_runs(
        dis, pos, neg, weight, margin, window if mined is None else mined.window, reduction,
        **repeats)
  loss = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  if spec["name"] == "sum":
    loss = num
  elif not fast:
    window = (mined.window if mined is not None
              else {"all": (-math.inf, math.inf), "semihard": (0.0, margin)}.get(mining))
    term = _triplet_term(dis, pos, neg, weight, margin, mining, mined, window, repeats)
    loss, _ = reducers.finish({"loss": term}, spec, labels=labels, loss_name="triplet")
  aux = {
      "num_triplets": n_mined,
      "num_active": n_active,
      "active_fraction": n_active / jnp.maximum(n_mined, 1.0),
  }
  return loss, aux, den


def triplet(*, embeddings: jax.Array, labels: jax.Array, ref_embeddings: jax.Array | None = None,
            ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
            ref_self_index: jax.Array | None = None, margin: float = 0.05,
            distance: distances.DistanceLike = "euclidean", mining: str = "all",
            reduction: reducers.Reduction = "avg_nonzero",
            mined: miners.Mined | None = None) -> reducers.LossAndAux:
  """Triplet margin loss; defaults are PML's `TripletMarginLoss()` numbers.

  Args:
    embeddings: float [B, D] anchors.
    labels: int [B].
    ref_embeddings, ref_labels, ref_valid, ref_self_index: optional reference
      set; see the `jaxdml.losses` docstring.
    margin: hinge margin (in units of `distance`; cosine margins are
      differences of similarities).
    distance: a distance (jaxdml.losses.distances); "euclidean" is PML's
      `LpDistance()`, which L2-normalises the rows first.
    mining: "all" | "hard" | "semihard" (see module docstring).
    reduction: "avg_nonzero" (PML's AvgNonZeroReducer, the default) or any
      reducer of jaxdml.losses.reducers, applied to PML's triplet losses.
    mined: a miner's selection (jaxdml.losses.miners) instead of `mining`.

  Returns:
    (loss, aux) with aux `num_triplets` (mined), `num_active` (those with a
    positive hinge) and `active_fraction` (their share).
  """
  p = pairs.prepare(embeddings=embeddings, labels=labels,
                    ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                    ref_valid=ref_valid, ref_self_index=ref_self_index,
                    loss_name="triplet")
  mat = distances.pairwise(p.query, p.ref, distance=distance)
  dis = distances.dissimilarity(mat, distance=distance)
  loss, aux, _ = weighted_triplet(dis=dis, pos=p.pos, neg=p.neg,
                                  weight=jnp.ones_like(dis), margin=margin,
                                  mining=mining, reduction=reduction, mined=mined,
                                  distance=distance, labels=labels)
  return loss, aux
