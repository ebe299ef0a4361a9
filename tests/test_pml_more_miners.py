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
  for hp in ({}, dict(angle=40)):
    want = _mine_pml(pml_miners.AngularMiner(**hp), x, labels, ref, ref_labels)
    mined = miners.get("angular")(**hp, **_jax(x, labels, ref, ref_labels))
    listed = np.asarray(mined.triplets)
    listed = listed[listed[:, 0] >= 0]
    # The same triplets in the same (anchor, positive, negative) order.
    np.testing.assert_array_equal(listed, torch.stack(want, 1).numpy(), err_msg=f"{hp}")
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
# (or by the same index tuple): name -> (PML loss, settings of both).
FED_LOSSES = {
    "triplet": (pml_losses.TripletMarginLoss, dict(margin=0.2)),
    "contrastive": (pml_losses.ContrastiveLoss, {}),
    "margin": (pml_losses.MarginLoss, {}),
    "ntxent": (pml_losses.NTXentLoss, {}),
    "multi_similarity": (pml_losses.MultiSimilarityLoss, {}),
}


@functools.cache
def _fed_value_and_grad(name):
  """One jit per loss: selections of one structure share its compilation."""
  hp = FED_LOSSES[name][1]
  return jax.jit(jax.value_and_grad(lambda e, y, mined: losses.get(name)(
      embeddings=e, labels=y, mined=mined, **hp)[0]))


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
    value, grad = _fed_value_and_grad(name)(jnp.asarray(x, jnp.float32), jnp.asarray(labels),
                                            mined)
    assert want.item() > 0, f"{name}: the case must exercise the loss"
    np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6, err_msg=name)
    g = xt.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=name)


def _pml_bin_counts(miner, values, chosen):
  """Per PML bin (its `get_bins` and bounds on `values`): how many of the
  chosen values fall in it, and which bins hold any of `values`."""
  bins = miner.get_bins(torch.tensor(values)).numpy()
  last = len(bins) - 2
  in_bin = lambda v, i: (bins[i] <= v) & ((v < bins[i + 1]) if i != last else (v <= bins[i + 1]))
  return (np.array([np.sum(in_bin(chosen, i)) for i in range(last + 1)]),
          np.array([np.any(in_bin(values, i)) for i in range(last + 1)]))


@pytest.mark.parametrize("settings", [{}, dict(num_bins=10, pos_per_bin=3, neg_per_bin=5)])
def test_uniform_histogram_fills_every_bin_with_its_share(settings):
  """Invariants, as it samples: each non-empty bin of PML's histogram gets
  exactly its per-bin number of draws (so as many pairs as PML returns),
  empty bins none; only valid pairs of the right kind are drawn; a seed
  reproduces its draw and another seed draws another."""
  x, labels, ref, ref_labels = _inputs("reference_set", seed=21, n=24)
  ref, ref_labels = np.concatenate([ref, x[:12]]), np.concatenate([ref_labels, labels[:12]])
  valid = np.arange(len(ref)) % 7 != 3
  self_index = np.where(np.arange(24) < 12, 9 + np.arange(24), -1)
  kw = dict(_jax(x, labels, ref, ref_labels), ref_valid=jnp.asarray(valid),
            ref_self_index=jnp.asarray(self_index, jnp.int32))
  mine = jax.jit(lambda key: miners.uniform_histogram(rng=key, **kw, **settings))
  mined = mine(jax.random.key(0))
  dist = _distances(x, ref)
  same = labels[:, None] == ref_labels[None]
  allowed = valid[None] & (np.arange(len(ref))[None] != self_index[:, None])
  pml = pml_miners.UniformHistogramMiner(**settings)
  want_len = []
  for counts, kind, per_bin in ((mined.pos, same & allowed, pml.pos_per_bin),
                                (mined.neg, ~same & allowed, pml.neg_per_bin)):
    counts = np.asarray(counts).astype(int)
    assert np.all(counts[~kind] == 0), "a drawn pair must be a valid pair of its kind"
    drawn, filled = _pml_bin_counts(pml, dist[kind], np.repeat(dist.ravel(), counts.ravel()))
    np.testing.assert_array_equal(drawn, np.where(filled, per_bin, 0))
    assert 0 < np.sum(~filled) or settings, "the default case must leave bins empty"
    want_len.append(np.sum(filled) * per_bin)
  assert [np.sum(mined.pos), np.sum(mined.neg)] == want_len
  # PML's own draw (in a batch: PML has no ref_valid) is as long as ours.
  a1, _, a2, _ = pml(*_torch(x, labels)[:2])
  ours = miners.uniform_histogram(rng=jax.random.key(2), **_jax(x, labels), **settings)
  assert [len(a1), len(a2)] == [np.sum(ours.pos), np.sum(ours.neg)]
  again, other = mine(jax.random.key(0)), mine(jax.random.key(1))
  np.testing.assert_array_equal(again.pos, mined.pos)
  np.testing.assert_array_equal(again.neg, mined.neg)
  assert np.any(other.pos != mined.pos) and np.any(other.neg != mined.neg)


def test_uniform_histogram_draws_uniformly_within_a_bin():
  x, labels, _, _ = _inputs("random", seed=8, n=16)
  kw = _jax(x, labels)
  draws = jax.jit(jax.vmap(lambda key: miners.uniform_histogram(
      rng=key, num_bins=4, pos_per_bin=2, neg_per_bin=2, **kw).neg))(
          jax.random.split(jax.random.key(3), 500))
  dist = _distances(x)
  neg = labels[:, None] != labels[None]
  edges = np.linspace(dist[neg].min(), dist[neg].max(), 5)
  first_bin = neg & (dist < edges[1])
  freq = np.asarray(draws).mean(axis=0)[first_bin]  # per pair, expected 2 / size
  expected = 2.0 / np.sum(first_bin)
  assert np.sum(first_bin) > 5, "the bin must hold several pairs"
  np.testing.assert_allclose(np.sum(freq), 2.0, rtol=1e-6)
  assert np.abs(freq - expected).max() < 5 * math.sqrt(expected / 500)


def _views(seed=0, n=8, dim=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)) * rng.uniform(0.3, 3.0, size=(n, 1))
  return x, (x + 0.6 * rng.normal(size=(n, dim))) * rng.uniform(0.5, 2.0, size=(n, 1))


SSL_CASES = [
    ("ntxent", pml_losses.NTXentLoss()),
    (dict(name="ntxent", temperature=0.3), pml_losses.NTXentLoss(temperature=0.3)),
    ("contrastive", pml_losses.ContrastiveLoss()),
    (functools.partial(losses.get("contrastive"), pos_margin=0.1, neg_margin=0.7),
     pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.7)),
    ("triplet", pml_losses.TripletMarginLoss()),
]


@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_equals_pml(symmetric):
  x, y = _views()
  for ours, theirs in SSL_CASES:
    xt, yt = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    want = pml_losses.SelfSupervisedLoss(theirs, symmetric=symmetric)(xt, yt)
    want.backward()
    fn = wrappers.self_supervised(ours, symmetric=symmetric)
    value, grads = jax.jit(jax.value_and_grad(
        lambda a, b: fn(embeddings=a, ref_embeddings=b)[0], argnums=(0, 1)))(
            jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert want.item() > 0
    np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6, err_msg=str(ours))
    for g, t in zip(grads, (xt, yt)):
      g_want = t.grad.numpy()
      np.testing.assert_allclose(g, g_want, rtol=1e-3, atol=1e-4 * np.abs(g_want).max(),
                                 err_msg=str(ours))


def test_self_supervised_registers_jits_and_names_its_errors():
  x, y = _views(seed=1)
  losses.register("_test_ssl", losses.wrappers.self_supervised("ntxent"))
  try:
    fn = losses.get("_test_ssl")
  finally:
    losses._REGISTRY.pop("_test_ssl")  # pylint: disable=protected-access
  eager = fn(embeddings=jnp.asarray(x), ref_embeddings=jnp.asarray(y), labels=jnp.zeros(8, int))
  jitted = jax.jit(lambda a, b: fn(embeddings=a, ref_embeddings=b))(jnp.asarray(x),
                                                                     jnp.asarray(y))
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  with pytest.raises(ValueError, match="does not support loss 'proxy_anchor'"):
    wrappers.self_supervised("proxy_anchor")
  with pytest.raises(ValueError, match="needs ref_embeddings"):
    fn(embeddings=jnp.asarray(x))
  with pytest.raises(ValueError, match="two views"):
    fn(embeddings=jnp.asarray(x), ref_embeddings=jnp.asarray(y[:5]))


def _pml_multiple(kind):
  """(PML's MultipleLosses, ours, PML miner feeding every term or None)."""
  if kind == "list":
    return (pml_losses.MultipleLosses([pml_losses.ContrastiveLoss(),
                                       pml_losses.TripletMarginLoss(margin=0.1)],
                                      weights=[1.0, 0.5]),
            wrappers.multiple(["contrastive", dict(name="triplet", margin=0.1)],
                              weights=[1.0, 0.5]), None)
  if kind == "list_miners":
    return (pml_losses.MultipleLosses([pml_losses.NTXentLoss(), pml_losses.TripletMarginLoss()],
                                      miners=[None, pml_miners.BatchHardMiner()]),
            wrappers.multiple(["ntxent", "triplet"], miners=[None, "batch_hard"]), None)
  if kind == "dict_miners":
    return (pml_losses.MultipleLosses(
        {"c": pml_losses.ContrastiveLoss(), "ms": pml_losses.MultiSimilarityLoss(),
         "t": pml_losses.TripletMarginLoss(margin=0.2)},
        miners={"c": pml_miners.PairMarginMiner(pos_margin=0.9, neg_margin=1.3),
                "t": pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")},
        weights={"c": 0.3, "ms": 2.0, "t": 1.0}),
            wrappers.multiple(
                {"c": "contrastive", "ms": "multi_similarity",
                 "t": functools.partial(losses.get("triplet"), margin=0.2)},
                miners={"c": dict(name="pair_margin", pos_margin=0.9, neg_margin=1.3),
                        "t": functools.partial(miners.triplet_margin, margin=0.2,
                                               type_of_triplets="semihard")},
                weights={"c": 0.3, "ms": 2.0, "t": 1.0}), None)
  return (pml_losses.MultipleLosses([pml_losses.ContrastiveLoss(), pml_losses.MarginLoss()]),
          wrappers.multiple(["contrastive", "margin"]), "multi_similarity")


@pytest.mark.parametrize("kind", ["list", "list_miners", "dict_miners", "shared_mined"])
def test_multiple_equals_pml(kind):
  x, labels, _, _ = _inputs("random", seed=13, n=16)
  theirs, ours, shared = _pml_multiple(kind)
  xt = torch.tensor(x, requires_grad=True)
  yt = torch.tensor(labels)
  kw = {}
  if shared:
    idx = pml_miners.MultiSimilarityMiner()(xt.detach(), yt)
    want = theirs(xt, yt, idx)
    kw["mined"] = miners.get(shared)(**_jax(x, labels))
  else:
    want = theirs(xt, yt)
  want.backward()
  fn = lambda e: ours(embeddings=e, labels=jnp.asarray(labels), **kw)
  (value, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6)
  g = xt.grad.numpy()
  np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
  terms = {"list": ["contrastive", "triplet"], "list_miners": ["ntxent", "triplet"],
           "dict_miners": ["c", "ms", "t"], "shared_mined": ["contrastive", "margin"]}[kind]
  weights = {"list": [1.0, 0.5], "dict_miners": [0.3, 2.0, 1.0]}.get(kind, [1.0] * len(terms))
  np.testing.assert_allclose(sum(w * aux[t] for w, t in zip(weights, terms)), value, rtol=1e-6)
  assert all(aux[t] > 0 for t in terms), "every term must count"
  assert any(k.startswith(terms[0] + "/") for k in aux), "the terms' own aux come along"


def test_multiple_jits_and_names_its_errors():
  x, labels, _, _ = _inputs("random", seed=2)
  kw = _jax(x, labels)
  twice = wrappers.multiple(["triplet", dict(name="triplet", margin=0.3)])
  value, aux = jax.jit(lambda e, y: twice(embeddings=e, labels=y))(kw["embeddings"],
                                                                   kw["labels"])
  assert {"triplet_0", "triplet_1"} <= set(aux)
  np.testing.assert_allclose(value, aux["triplet_0"] + aux["triplet_1"], rtol=1e-6)
  with pytest.raises(ValueError, match="as long as the losses"):
    wrappers.multiple(["triplet", "contrastive"], weights=[1.0])
  with pytest.raises(ValueError, match="losses' keys"):
    wrappers.multiple({"a": "triplet", "b": "contrastive"}, weights={"a": 1.0})
  with pytest.raises(ValueError, match="Unknown loss"):
    wrappers.multiple(["triplets"])
  with pytest.raises(ValueError, match="needs an rng"):
    wrappers.multiple(["triplet"], miners=["uniform_histogram"])
  mined_twice = wrappers.multiple(["triplet"], miners=["batch_hard"])
  with pytest.raises(ValueError, match="own miners"):
    mined_twice(mined=miners.batch_hard(**kw), **kw)


def test_new_miner_errors_name_the_fix():
  kw = _jax(*_inputs("random", seed=0)[:2])
  with pytest.raises(ValueError, match="filter_percentage"):
    miners.hdc(filter_percentage=1.5, **kw)
  with pytest.raises(ValueError, match=r"\(a1, p, a2, n\) or \(a, p, n\)"):
    miners.from_indices((jnp.arange(3), jnp.arange(3)), shape=(12, 12))
  with pytest.raises(ValueError, match="one length"):
    miners.from_indices((jnp.arange(3), jnp.arange(2), jnp.arange(4), jnp.arange(4)),
                        shape=(12, 12))
  with pytest.raises(ValueError, match="num_anchors, num_candidates"):
    miners.from_indices((jnp.arange(3),) * 3, shape=12)
  with pytest.raises(ValueError, match=r"int \[T, 3\]"):
    miners.from_triplets(jnp.zeros((4, 3)), shape=(12, 12))
  with pytest.raises(ValueError, match="same embeddings"):
    miners.hdc(mined=miners.hdc(**kw), **_jax(*_inputs("random", seed=0, n=8)[:2]))


def test_new_miners_jit_to_what_they_mine_eagerly():
  kw = _jax(*_inputs("random", seed=6)[:2])
  mine_all = lambda e, y: (miners.angular(embeddings=e, labels=y),
                           miners.hdc(mined=miners.hdc(embeddings=e, labels=y), embeddings=e,
                                      labels=y, filter_percentage=0.3),
                           miners.already_packaged_as_triplets(embeddings=e, labels=y))
  args = (kw["embeddings"], kw["labels"])
  for eager, jitted in zip(mine_all(*args), jax.jit(mine_all)(*args)):
    for field in ("pos", "neg", "tpos", "tneg", "triplets"):
      np.testing.assert_array_equal(getattr(jitted, field), getattr(eager, field))


def test_with_miner_binds_a_sampling_miners_key():
  # A user's loop: with_miner(..., rng=) draws what the miner itself draws
  # with that key; without a key it refuses, naming rng=.
  rng = np.random.default_rng(3)
  e = rng.normal(size=(16, 8)).astype(np.float32)
  y = np.arange(16) % 4
  key = jax.random.key(7)
  contrastive = losses.get("contrastive")
  mined = miners.distance_weighted(rng=key, embeddings=e, labels=y, cutoff=0.5)
  want, _ = contrastive(embeddings=e, labels=y, mined=mined)
  got, _ = miners.with_miner(contrastive, {"name": "distance_weighted", "cutoff": 0.5},
                             rng=key)(embeddings=e, labels=y)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  other, _ = miners.with_miner(contrastive, "distance_weighted",
                               rng=jax.random.key(8))(embeddings=e, labels=y)
  assert float(other) != float(want)
  with pytest.raises(ValueError, match="pass rng="):
    miners.with_miner(contrastive, "distance_weighted")
