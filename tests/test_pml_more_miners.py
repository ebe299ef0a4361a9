"""PML 2.9.0's AngularMiner, HDCMiner, UniformHistogramMiner,
EmbeddingsAlreadyPackagedAsTriplets, explicit index tuples, and the
SelfSupervisedLoss / MultipleLosses wrappers, against PML on the same arrays.

Selections are compared as count matrices (PML's lists through its
`convert_to_pairs` / `convert_to_triplets`), losses fed by them by value and
gradient (torch float64 vs JAX float32). Embeddings are raw: rows of varied
norm, which PML's default distances normalise first, as ours do.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from jaxdml import losses
from jaxdml.losses import miners
from jaxdml.losses import wrappers


def _inputs(case, seed, n=12, dim=6):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % 4)
  if case == "one_sample":
    labels[0] = 4
  x = rng.normal(size=(n, dim)) * rng.uniform(0.3, 3.0, size=(n, 1))
  if case == "ties":
    x[n // 2:] = x[:n // 2]
    labels[n // 2:] = labels[:n // 2]
  ref, ref_labels = None, None
  if case == "reference_set":
    ref = rng.normal(size=(9, dim)) * rng.uniform(0.3, 3.0, size=(9, 1))
    ref_labels = rng.integers(0, 5, 9)
  return x, labels, ref, ref_labels


def _torch(x, labels, ref=None, ref_labels=None):
  t = lambda a, dt: None if a is None else torch.tensor(a, dtype=dt)
  return (t(x, torch.float64), t(labels, torch.long), t(ref, torch.float64),
          t(ref_labels, torch.long))


def _jax(x, labels, ref=None, ref_labels=None):
  kw = dict(embeddings=jnp.asarray(x, jnp.float32), labels=jnp.asarray(labels, jnp.int32))
  if ref is not None:
    kw.update(ref_embeddings=jnp.asarray(ref, jnp.float32),
              ref_labels=jnp.asarray(ref_labels, jnp.int32))
  return kw


def _mine_pml(miner, x, labels, ref, ref_labels):
  args = _torch(x, labels, ref, ref_labels)
  return miner(*args) if ref is not None else miner(*args[:2])


def _counts(shape, rows, cols):
  out = np.zeros(shape)
  np.add.at(out, (np.asarray(rows), np.asarray(cols)), 1)
  return out


def _assert_same_selection(mined, want, labels, ref_labels, shape):
  """Our counts equal PML's list, as pairs and as triplets."""
  yt = torch.tensor(labels)
  ryt = None if ref_labels is None else torch.tensor(ref_labels)
  a1, p, a2, n = lmu.convert_to_pairs(want, yt, ryt)
  np.testing.assert_array_equal(mined.pos, _counts(shape, a1, p))
  np.testing.assert_array_equal(mined.neg, _counts(shape, a2, n))
  a, tp, tn = lmu.convert_to_triplets(want, yt, ryt)
  np.testing.assert_array_equal(mined.tpos, _counts(shape, a, tp))
  np.testing.assert_array_equal(mined.tneg, _counts(shape, a, tn))


@pytest.mark.parametrize("case", ["random", "one_sample", "reference_set"])
def test_angular_selects_what_pml_selects(case):
  x, labels, ref, ref_labels = _inputs(case, seed=11 + len(case))
  shape = (len(x), len(x if ref is None else ref))
  for angle in (20, 40):
    want = _mine_pml(pml_miners.AngularMiner(angle=angle), x, labels, ref, ref_labels)
    mined = miners.get("angular")(angle=angle, **_jax(x, labels, ref, ref_labels))
    listed = np.asarray(mined.triplets)
    listed = listed[listed[:, 0] >= 0]
    # The same triplets in the same (anchor, positive, negative) order.
    np.testing.assert_array_equal(listed, torch.stack(want, 1).numpy(), err_msg=f"{angle}")
    _assert_same_selection(mined, want, labels, ref_labels, shape)
    all_triplets = len(lmu.get_all_triplets_indices(*_torch(x, labels, ref, ref_labels)[1::2])[0])
    assert 0 < len(listed) < all_triplets, "the angle must keep some triplets, not all"


HDC_SETTINGS = [{}, dict(filter_percentage=0.3), dict(filter_percentage=0.15),
                dict(filter_percentage=0.7, distance="cosine")]


def _pml_hdc(filter_percentage=0.5, distance="euclidean"):
  dist = pml_distances.CosineSimilarity() if distance == "cosine" else pml_distances.LpDistance()
  return pml_miners.HDCMiner(filter_percentage=filter_percentage, distance=dist)


def _distances(x, ref=None, cosine=False):
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  q, r = unit(x), unit(x if ref is None else ref)
  return -(q @ r.T) if cosine else np.linalg.norm(q[:, None] - r[None], axis=-1)


def _assert_as_hard(mined, want, dist):
  """The kept pairs' distances, repeats included, equal PML's: what ties
  allow to compare (torch.topk breaks them in no set order, and in a batch
  (i, j) and (j, i) always tie)."""
  for ours, (rows, cols) in ((mined.pos, want[:2]), (mined.neg, want[2:])):
    ours = np.asarray(ours).astype(int)
    np.testing.assert_allclose(np.sort(np.repeat(dist.ravel(), ours.ravel())),
                               np.sort(dist[rows.numpy(), cols.numpy()]), rtol=1e-5)


@pytest.mark.parametrize("case", ["random", "one_sample", "ties", "reference_set"])
def test_hdc_selects_what_pml_selects(case):
  x, labels, ref, ref_labels = _inputs(case, seed=3 + len(case))
  shape = (len(x), len(x if ref is None else ref))
  for hp in HDC_SETTINGS:
    want = _mine_pml(_pml_hdc(**hp), x, labels, ref, ref_labels)
    mined = miners.get("hdc")(**_jax(x, labels, ref, ref_labels), **hp)
    _assert_as_hard(mined, want, _distances(x, ref, cosine="distance" in hp))
    if case == "reference_set":  # no ties: the very same pairs
      _assert_same_selection(mined, want, labels, ref_labels, shape)


def test_hdc_cascades_like_pml_set_idx_externally():
  """PML chains HDC miners with `set_idx_externally`: the next one filters
  the previous one's pairs (repeats included, as a triplet miner's are)."""
  x, labels, ref, ref_labels = _inputs("reference_set", seed=5, n=16)
  xt, yt, rt, ryt = _torch(x, labels, ref, ref_labels)
  kw = _jax(x, labels, ref, ref_labels)
  firsts = [(pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="all"),
             miners.triplet_margin(margin=0.3, type_of_triplets="all", **kw)),
            (_pml_hdc(0.5), miners.hdc(filter_percentage=0.5, **kw))]
  for first_pml, first in firsts:
    second = _pml_hdc(0.3)
    second.set_idx_externally(first_pml(xt, yt, rt, ryt), yt)
    want = second(xt, yt, rt, ryt)
    mined = miners.hdc(filter_percentage=0.3, mined=first, **kw)
    _assert_same_selection(mined, want, labels, ref_labels, (16, 9))
  assert np.max(np.asarray(mined.pos)) == 1 and np.max(np.asarray(
      miners.hdc(filter_percentage=0.9, mined=firsts[0][1], **kw).pos)) > 1


def test_ceil_like_python_is_exact():
  """HDC keeps ceil(filter_percentage * n) pairs, n traced: the product must
  round as Python's float64 does, where float32 differs (0.3 * 50)."""
  rng = np.random.default_rng(0)
  counts = np.concatenate([np.arange(0, 2000), 10 * rng.integers(0, 2**27, 500),
                           rng.integers(0, 2**31 - 1, 500), [2**31 - 1]]).astype(np.int32)
  fractions = (0.5, 0.1, 0.3, 0.15, 0.33, 0.7, 1.0, 0.0, 1e-9, 0.123456789)
  got = jax.jit(lambda c: jnp.stack([miners.ceil_like_python(c, f) for f in fractions]))(
      counts)
  want = np.array([[math.ceil(f * int(c)) for c in counts] for f in fractions])
  np.testing.assert_array_equal(got, want)
  assert np.any(np.ceil(np.float32(0.3) * counts.astype(np.float32)) != want[2])


def test_from_indices_counts_like_pml():
  """PML's index tuples, with repeats and -1 padding, as selections, under jit."""
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 3, 10)
  pairs_pml = lmu.get_all_pairs_indices(torch.tensor(labels))
  pick_p, pick_n = rng.integers(0, len(pairs_pml[0]), 25), rng.integers(0, len(pairs_pml[2]), 30)
  want_pairs = (pairs_pml[0][pick_p], pairs_pml[1][pick_p], pairs_pml[2][pick_n],
                pairs_pml[3][pick_n])
  triplets_pml = lmu.get_all_triplets_indices(torch.tensor(labels))
  pick_t = rng.integers(0, len(triplets_pml[0]), 40)
  want_triplets = tuple(t[pick_t] for t in triplets_pml)
  pad = lambda t, k: jnp.concatenate([jnp.asarray(t.numpy(), jnp.int32),
                                      -jnp.ones(k, jnp.int32)])
  from_pml = jax.jit(lambda idx: miners.from_indices(idx, shape=(10, 10)))
  for want, extra in ((want_pairs, (3, 3, 5, 5)), (want_triplets, (4, 4, 4))):
    mined = from_pml(tuple(pad(t, k) for t, k in zip(want, extra)))
    _assert_same_selection(mined, want, labels, None, (10, 10))
  assert np.max(np.asarray(mined.pos)) > 1, "the case must repeat a pair"


def test_already_packaged_as_triplets_is_pml():
  x, _, _, _ = _inputs("random", seed=1)
  labels = np.repeat(np.arange(4), 3)
  labels[2::3] += 10  # each triplet's negative has a label of its own
  want = pml_miners.EmbeddingsAlreadyPackagedAsTriplets()(*_torch(x, labels)[:2])
  mined = miners.get("already_packaged_as_triplets")(**_jax(x, labels))
  _assert_same_selection(mined, want, labels, None, (12, 12))
  with pytest.raises(ValueError, match="multiple of 3"):
    miners.already_packaged_as_triplets(**_jax(x[:10], labels[:10]))
  with pytest.raises(ValueError, match="reference set"):
    miners.already_packaged_as_triplets(**_jax(x, labels, x, labels))


# Losses fed by the new miners, against the same PML loss fed by PML's miner
# (or by the same index tuple): (PML loss, settings, ours).
FED_LOSSES = {
    "triplet": (pml_losses.TripletMarginLoss, dict(margin=0.2)),
    "contrastive": (pml_losses.ContrastiveLoss, {}),
    "margin": (pml_losses.MarginLoss, {}),
    "ntxent": (pml_losses.NTXentLoss, {}),
    "multi_similarity": (pml_losses.MultiSimilarityLoss, {}),
}


def _as_pml_tuple(mined):
  """Our pair counts as PML's (a1, p, a2, n), each pair repeated."""
  out = []
  for counts in (mined.pos, mined.neg):
    counts = np.asarray(counts).astype(int)
    rows, cols = np.nonzero(counts)
    reps = counts[rows, cols]
    out += [torch.tensor(np.repeat(rows, reps)), torch.tensor(np.repeat(cols, reps))]
  return tuple(out)


def _fed_case(source, x, labels):
  """(PML's indices, our Mined) for one way of mining."""
  xt, yt, _, _ = _torch(x, labels)
  kw = _jax(x, labels)
  if source == "angular":
    return pml_miners.AngularMiner()(xt, yt), miners.angular(**kw)
  if source == "hdc":
    return _pml_hdc()(xt, yt), miners.hdc(**kw)
  if source == "hdc_cascade":  # settings whose cut falls between tied (i, j), (j, i)
    second = _pml_hdc(0.4)
    second.set_idx_externally(pml_miners.TripletMarginMiner(margin=0.2)(xt, yt), yt)
    return second(xt, yt), miners.hdc(filter_percentage=0.4,
                                      mined=miners.triplet_margin(margin=0.2, **kw), **kw)
  if source == "already_packaged_as_triplets":
    return (pml_miners.EmbeddingsAlreadyPackagedAsTriplets()(xt, yt),
            miners.already_packaged_as_triplets(**kw))
  if source == "uniform_histogram":
    mined = miners.uniform_histogram(rng=jax.random.key(0), num_bins=8, pos_per_bin=3,
                                     neg_per_bin=4, **kw)
    return _as_pml_tuple(mined), mined
  rng = np.random.default_rng(9)  # a tuple given by hand, with repeated entries
  if source == "pair_indices":
    all_pairs = lmu.get_all_pairs_indices(yt)
    pick_p, pick_n = rng.integers(0, len(all_pairs[0]), 30), rng.integers(0, len(all_pairs[2]),
                                                                           40)
    want = (all_pairs[0][pick_p], all_pairs[1][pick_p], all_pairs[2][pick_n],
            all_pairs[3][pick_n])
  else:
    all_triplets = lmu.get_all_triplets_indices(yt)
    pick = rng.integers(0, len(all_triplets[0]), 50)
    want = tuple(t[pick] for t in all_triplets)
  return want, miners.from_indices(tuple(jnp.asarray(t.numpy()) for t in want),
                                   shape=(len(x), len(x)))


@pytest.mark.parametrize("source", ["angular", "hdc", "hdc_cascade", "uniform_histogram",
                                    "pair_indices", "triplet_indices",
                                    "already_packaged_as_triplets"])
def test_losses_fed_by_the_new_miners_equal_pml(source):
  x, labels, _, _ = _inputs("random", seed=7, n=18)
  if source == "already_packaged_as_triplets":
    labels = np.repeat(np.arange(6) % 3, 3)
    labels[2::3] = (labels[2::3] + 1) % 3  # negatives of another class
  want_idx, mined = _fed_case(source, x, labels)
  _assert_same_selection(mined, want_idx, labels, None, (18, 18))
  for name, (make, hp) in FED_LOSSES.items():
    xt = torch.tensor(x, requires_grad=True)
    want = make(**hp)(xt, torch.tensor(labels), want_idx)
    want.backward()
    fn = lambda e: losses.get(name)(embeddings=e, labels=jnp.asarray(labels), mined=mined,
                                    **hp)[0]
    value, grad = jax.value_and_grad(fn)(jnp.asarray(x, jnp.float32))
    assert want.item() > 0, f"{name}: the case must exercise the loss"
    np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6, err_msg=name)
    g = xt.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=name)
