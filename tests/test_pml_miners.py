"""Miners against PML 2.9.0 on the same arrays: the selections, and the losses
fed with them.

PML returns index tuples; ours are [B, R] counts (`Mined`). Both are turned
into count matrices here: the pairs as a pair loss sees them (PML's
`convert_to_pairs`) and the triplets as a triplet loss sees them
(`convert_to_triplets`, as an [B, R, R] indicator built only in the test).
Inputs: random batches, a class with one sample, tied (duplicate)
embeddings, and a reference set. Embeddings are L2-normalised, what PML's
default `LpDistance` does first.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from jaxdml import losses
from jaxdml.losses import distances
from jaxdml.losses import miners

# name -> (PML class, settings). PML's settings use its names; "distance" is
# ours (PML's default LpDistance / CosineSimilarity).
MINERS = {
    "batch_hard": (pml_miners.BatchHardMiner, [{}]),
    "batch_easy_hard": (pml_miners.BatchEasyHardMiner, [
        {}, dict(pos_strategy="hard", neg_strategy="semihard"),
        dict(pos_strategy="semihard", neg_strategy="easy"),
        dict(pos_strategy="all", neg_strategy="hard"),
        dict(pos_strategy="easy", neg_strategy="all"),
        dict(pos_strategy="hard", neg_strategy="hard", allowed_pos_range=(0.2, 1.3),
             allowed_neg_range=(0.5, 1.6))]),
    "pair_margin": (pml_miners.PairMarginMiner, [{}, dict(pos_margin=0.9, neg_margin=1.3)]),
    "triplet_margin": (pml_miners.TripletMarginMiner, [
        dict(type_of_triplets=t, margin=m) for t in miners.TRIPLET_TYPES for m in (0.2, 0.5)]),
    "multi_similarity": (pml_miners.MultiSimilarityMiner, [{}, dict(epsilon=0.3)]),
}
CASES = ["random", "one_sample", "ties", "reference_set"]


def _inputs(case, seed, n=12, dim=6):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % 4)
  if case == "one_sample":
    labels[0] = 4
  x = rng.normal(size=(n, dim))
  if case == "ties":
    x[n // 2:] = x[:n // 2]
    labels[n // 2:] = labels[:n // 2]
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  ref, ref_labels = None, None
  if case == "reference_set":
    ref = rng.normal(size=(9, dim))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    ref_labels = rng.integers(0, 5, 9)
  return x, labels, ref, ref_labels


def _torch(x, labels, ref, ref_labels):
  t = lambda a, dt: None if a is None else torch.tensor(a, dtype=dt)
  return (t(x, torch.float64), t(labels, torch.long), t(ref, torch.float64),
          t(ref_labels, torch.long))


def _jax(x, labels, ref, ref_labels):
  kw = dict(embeddings=jnp.asarray(x, jnp.float32), labels=jnp.asarray(labels, jnp.int32))
  if ref is not None:
    kw.update(ref_embeddings=jnp.asarray(ref, jnp.float32),
              ref_labels=jnp.asarray(ref_labels, jnp.int32))
  return kw


def _counts(shape, rows, cols):
  out = np.zeros(shape)
  np.add.at(out, (rows.numpy(), cols.numpy()), 1)
  return out


def _triplet_indicator(shape, a, p, n):
  out = np.zeros(shape + (shape[1],))
  np.add.at(out, (a.numpy(), p.numpy(), n.numpy()), 1)
  return out


def _our_triplets(mined, dis):
  lo, hi = mined.window
  margin = dis[:, None, :] - dis[:, :, None]  # [a, p, n]: dis_an - dis_ap
  t = (np.asarray(mined.t_pos)[:, :, None] & np.asarray(mined.t_neg)[:, None, :]
       & (margin > lo) & (margin <= hi))
  return t.astype(float)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(MINERS))
def test_miners_select_what_pml_selects(name, case):
  make, settings = MINERS[name]
  x, labels, ref, ref_labels = _inputs(case, seed=len(name) + 5 * len(case))
  xt, yt, rt, ryt = _torch(x, labels, ref, ref_labels)
  ref_or_x = x if ref is None else ref
  shape = (len(x), len(ref_or_x))
  cosine = name == "multi_similarity"
  dis = (-(x @ ref_or_x.T) if cosine else
         np.linalg.norm(x[:, None] - ref_or_x[None], axis=-1)).astype(np.float32)
  for hp in settings:
    want = make(**hp)(xt, yt, rt, ryt) if ref is not None else make(**hp)(xt, yt)
    mined = miners.get(name)(**_jax(x, labels, ref, ref_labels), **hp)
    a1, p, a2, n = lmu.convert_to_pairs(want, yt, ryt)
    np.testing.assert_array_equal(mined.pos, _counts(shape, a1, p), err_msg=f"{hp}")
    np.testing.assert_array_equal(mined.neg, _counts(shape, a2, n), err_msg=f"{hp}")
    a, tp, tn = lmu.convert_to_triplets(want, yt, ryt)
    np.testing.assert_array_equal(mined.tpos, _counts(shape, a, tp), err_msg=f"{hp}")
    np.testing.assert_array_equal(mined.tneg, _counts(shape, a, tn), err_msg=f"{hp}")
    np.testing.assert_array_equal(_our_triplets(mined, dis),
                                  _triplet_indicator(shape, a, tp, tn), err_msg=f"{hp}")
  # The case must select something and leave something out.
  assert 0 < np.sum(mined.tpos) and np.sum(mined.pos) + np.sum(mined.neg) < 2 * np.prod(shape)


# Losses fed by a miner: (PML loss, settings). Losses on PML's default
# LpDistance (it L2-normalises first) get normalised embeddings, so the
# gradient goes through the normalisation on both sides; cosine losses
# normalise inside.
MINED_LOSSES = {
    "contrastive": (pml_losses.ContrastiveLoss, {}),
    "triplet": (pml_losses.TripletMarginLoss, dict(margin=0.2)),
    "margin": (pml_losses.MarginLoss, {}),
    "multi_similarity": (pml_losses.MultiSimilarityLoss, {}),
    "ntxent": (pml_losses.NTXentLoss, {}),
    "supcon": (pml_losses.SupConLoss, {}),
    "circle": (pml_losses.CircleLoss, {}),
    "tuplet_margin": (pml_losses.TupletMarginLoss, {}),
    "generalized_lifted_structure": (pml_losses.GeneralizedLiftedStructureLoss, {}),
    "lifted_structure": (pml_losses.LiftedStructureLoss, {}),
}
COSINE = ("multi_similarity", "ntxent", "supcon", "circle", "tuplet_margin")
FEEDING = [("multi_similarity", {}), ("pair_margin", dict(pos_margin=0.9, neg_margin=1.3)),
           ("batch_hard", {}), ("batch_easy_hard", dict(pos_strategy="all", neg_strategy="hard")),
           ("triplet_margin", dict(margin=0.3, type_of_triplets="semihard")),
           ("triplet_margin", dict(margin=0.2, type_of_triplets="all"))]


@pytest.mark.parametrize("miner,miner_hp", FEEDING, ids=[f"{m}-{i}" for i, (m, _) in
                                                          enumerate(FEEDING)])
@pytest.mark.parametrize("name", sorted(MINED_LOSSES))
def test_losses_fed_by_a_miner_equal_pml(name, miner, miner_hp):
  make, hp = MINED_LOSSES[name]
  x, labels, _, _ = _inputs("random", seed=7, n=16)
  xt, yt, _, _ = _torch(x, labels, None, None)
  xt.requires_grad_(True)
  mined_pml = make_miner = MINERS[miner][0](**miner_hp)(xt.detach(), yt)
  want = make(**hp)(xt, yt, mined_pml)
  unit = (lambda e: e) if name in COSINE else distances.l2_normalize
  cosine_miner = miner == "multi_similarity"
  fn = lambda e: losses.get(name)(
      embeddings=unit(e), labels=jnp.asarray(labels),
      mined=miners.get(miner)(embeddings=e if cosine_miner else unit(e),
                              labels=jnp.asarray(labels), **miner_hp), **hp)[0]
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x, jnp.float32))
  assert want.item() > 0, "the case must exercise the loss"
  want.backward()
  np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6)
  g = xt.grad.numpy()
  np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
  del make_miner


def test_distance_weighted_samples_pml_distribution():
  x, labels, _, _ = _inputs("random", seed=3, n=16, dim=8)
  captured = {}

  def capture(labels, ref_labels=None, t_per_anchor=None, weights=None):
    captured["weights"] = weights.numpy()
    return lmu.get_all_triplets_indices(labels)
  original = lmu.get_random_triplet_indices
  lmu.get_random_triplet_indices = capture
  try:
    pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(
        *_torch(x, labels, None, None)[:2])
  finally:
    lmu.get_random_triplet_indices = original
  want = np.nan_to_num(captured["weights"])
  kw = _jax(x, labels, None, None)
  prob = miners.distance_weighted_probabilities(**kw)
  np.testing.assert_allclose(prob, want, rtol=1e-4, atol=1e-7)
  assert np.all(np.sum(want > 0, axis=1) > 2), "the case must spread the weights"
  # Sampled negatives follow the distribution: 400 draws per (a, p) pair.
  draws = jax.vmap(lambda k: miners.distance_weighted(rng=k, **kw).sampled_neg)(
      jax.random.split(jax.random.key(0), 400))
  pos = np.asarray(miners.distance_weighted(rng=jax.random.key(1), **kw).t_pos)
  a = np.nonzero(pos)[0][0]
  p = np.nonzero(pos[a])[0][0]
  freq = np.bincount(np.asarray(draws[:, a, p]), minlength=len(x)) / 400
  assert np.abs(freq - want[a]).max() < 4 * math.sqrt(0.25 / 400)
  assert np.all(freq[want[a] == 0] == 0)


def test_miner_errors_name_the_fix():
  kw = dict(embeddings=jnp.ones((4, 3)), labels=jnp.arange(4))
  with pytest.raises(ValueError, match="miners: .*batch_easy_hard"):
    miners.get("hardest")
  with pytest.raises(ValueError, match="cannot both be"):
    miners.batch_easy_hard(pos_strategy="semihard", neg_strategy="semihard", **kw)
  with pytest.raises(ValueError, match="type_of_triplets"):
    miners.triplet_margin(type_of_triplets="medium", **kw)
  mined = miners.pair_margin(**kw)
  with pytest.raises(ValueError, match="same embeddings"):
    losses.get("contrastive")(embeddings=jnp.ones((5, 3)), labels=jnp.arange(5), mined=mined)
  with pytest.raises(ValueError, match="needs an rng"):
    miners.with_miner(losses.get("triplet"), "distance_weighted")
