"""PML's `TuplesToWeightsSampler`: sampling by how often a miner uses an example.

At the start of each epoch PML embeds a random subset of the data set with
the model, mines it, and weights every example by how many times it occurs
in the miner's tuples over the largest such count (`convert_to_weights`:
every subset example 1 when nothing is mined, 0 outside the subset); the
epoch then draws its examples by weight, with replacement.

Here the model is a function `embed(rows) -> embeddings` and the miner one of
`jaxdml.losses.miners`. The epoch of step `s` is `s // steps_per_epoch`, its
subset comes from the seed, so the batch of step `s` is a pure function of
(seed, s) given `embed`: a resumed run replays an uninterrupted one when
`embed` gives the epoch's embeddings (its starting model) again.

This module imports JAX (the miners); `jaxdml.data.samplers` stays free of
it for the pipeline's worker processes.
"""
from typing import Callable

import jax
import numpy as np

from jaxdml.data import samplers
from jaxdml.losses import miners

# PML's miners return triplets (a, p, n) or pairs (a1, p, a2, n); the weights
# count every index of the tuple, so an anchor of a pair miner counts once per
# pair it is in, of a triplet miner once per triplet.
_TRIPLET_MINERS = ("batch_hard", "distance_weighted", "triplet_margin")
_PAIR_MINERS = ("batch_easy_hard", "multi_similarity", "pair_margin")


def _miner_spec(miner) -> tuple[str, dict]:
  """(name, hyperparameters) of a miner given as a name, a dict
  `{"name": ..., **hparams}` or one of the registered miner functions."""
  if callable(miner):
    by_function = {miners.get(n): n for n in miners.names()}
    if miner not in by_function:
      raise ValueError(f"miner {miner!r} is not one of jaxdml.losses.miners' miners; pass "
                       f"one of them, a name or dict(name=..., **hparams): {miners.names()}.")
    return by_function[miner], {}
  spec = {"name": miner} if isinstance(miner, str) else dict(miner)
  name = spec.pop("name", None)
  miners.get(name)  # an unknown name raises, naming the miners
  if name not in _TRIPLET_MINERS + _PAIR_MINERS:
    raise ValueError(f"miner {name!r} is not classed as a pair or triplet miner; add it to "
                     "jaxdml.data.tuple_weights' _PAIR_MINERS or _TRIPLET_MINERS.")
  return name, spec


def tuple_counts(embeddings, labels, *, miner, rng=None) -> np.ndarray:
  """float32 [S]: how many times each row occurs in the miner's tuples, all
  positions counted (PML's `convert_to_weights` before normalising).

  Args:
    embeddings: float [S, D]; labels: int [S].
    miner: a `jaxdml.losses.miners` name, dict or function (`_miner_spec`).
    rng: a JAX key, for the sampling miner "distance_weighted" only.
  """
  name, hparams = _miner_spec(miner)
  if name == "distance_weighted":
    if rng is None:
      raise ValueError("miner 'distance_weighted' samples: pass rng=, a JAX key.")
    hparams = {**hparams, "rng": rng}
  mined = miners.get(name)(embeddings=embeddings, labels=labels, **hparams)
  if name in _TRIPLET_MINERS:
    # Triplet (a, p, n) is one count in tpos[a, p] and one in tneg[a, n].
    counts = mined.tpos.sum(1) + mined.tpos.sum(0) + mined.tneg.sum(0)
  else:
    counts = mined.pos.sum(1) + mined.pos.sum(0) + mined.neg.sum(1) + mined.neg.sum(0)
  return np.asarray(counts, np.float32)


def tuple_weights(embed: Callable, labels, *, miner, seed: int, epoch: int,
                  subset_size: int | None = None) -> np.ndarray:
  """float32 [N]: the sampling weights of epoch `epoch` (PML's `weights`).

  Args:
    embed: int64 rows [S] -> float embeddings [S, D] of those rows (the
      model in eval mode, as PML's tester embeds).
    labels: int array [N] of every row's class.
    miner: a `jaxdml.losses.miners` name, `dict(name=..., **hparams)` or
      registered function; mined on the whole subset at once ([S, S]).
    seed, epoch: pick the subset (and the draws of a sampling miner).
    subset_size: rows embedded and mined, a seeded draw without
      replacement; None embeds all N, PML's default.
  """
  labels = np.asarray(labels)
  n = len(labels)
  if subset_size is None:
    rows = np.arange(n)
  elif not 1 <= subset_size <= n:
    raise ValueError(f"subset_size ({subset_size}) must be in [1, {n}], the rows of the data; "
                     "None embeds them all.")
  else:
    rng = np.random.default_rng([seed, samplers.TUPLE_SUBSET, epoch])
    rows = np.sort(rng.choice(n, size=subset_size, replace=False))
  embeddings = embed(rows)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(rows):
    raise ValueError(f"embed(rows) must return [len(rows), D] = [{len(rows)}, D] embeddings; "
                     f"got shape {embeddings.shape}.")
  key = jax.random.fold_in(jax.random.key(seed), samplers.TUPLE_SUBSET)
  counts = tuple_counts(embeddings, labels[rows], miner=miner,
                        rng=jax.random.fold_in(key, epoch))
  weights = np.zeros(n, np.float32)
  weights[rows] = counts / counts.max() if counts.max() > 0 else 1.0
  return weights


def steps_per_epoch(num_rows: int, *, batch_size: int, subset_size: int | None = None) -> int:
  """PML's iterator length (`subset_size`, else all rows) in whole batches."""
  length = num_rows if subset_size is None else subset_size
  if not 1 <= batch_size <= length:
    raise ValueError(f"batch_size ({batch_size}) must be in [1, {length}], the samples of an "
                     "epoch (subset_size, else the rows of the data).")
  return length // batch_size


def tuples_to_weights_batch_indices(embed: Callable, labels, *, miner, batch_size: int,
                                    seed: int, step: int,
                                    subset_size: int | None = None) -> np.ndarray:
  """int64 [batch_size]: step `step`'s rows, drawn by its epoch's
  `tuple_weights` (with replacement). Embeds and mines at every call:
  `TuplesToWeights` does it once an epoch."""
  epoch = step // steps_per_epoch(len(labels), batch_size=batch_size, subset_size=subset_size)
  weights = tuple_weights(embed, labels, miner=miner, seed=seed, epoch=epoch,
                          subset_size=subset_size)
  return samplers.weighted_batch_indices(weights, batch_size=batch_size, seed=seed, step=step)


class TuplesToWeights(samplers.StepSampler):
  """PML's `TuplesToWeightsSampler(model, miner, dataset, subset_size)` for
  a user's own loop: `batch(step)` as `tuples_to_weights_batch_indices`,
  embedding and mining once an epoch, when its first batch is asked for
  (`weights` holds that epoch's weights). An epoch is `subset_size` (else
  all) samples, in batches."""

  def __init__(self, embed: Callable, labels, miner, batch_size: int, *,
               subset_size: int | None = None, seed: int = 0, start_step: int = 0):
    _miner_spec(miner)  # an unknown miner raises here
    self.embed, self.labels, self.miner = embed, np.asarray(labels), miner
    self.batch_size, self.subset_size = int(batch_size), subset_size
    self.seed, self.start_step = seed, start_step
    self.steps_per_epoch = steps_per_epoch(len(self.labels), batch_size=self.batch_size,
                                           subset_size=subset_size)
    self.weights, self._weights_epoch = None, None

  def batch(self, step: int) -> np.ndarray:
    epoch = step // self.steps_per_epoch
    if epoch != self._weights_epoch:
      self.weights = tuple_weights(self.embed, self.labels, miner=self.miner, seed=self.seed,
                                   epoch=epoch, subset_size=self.subset_size)
      self._weights_epoch = epoch
    return samplers.weighted_batch_indices(self.weights, batch_size=self.batch_size,
                                           seed=self.seed, step=step)
