"""PML 2.9.0's samplers as (seed, step) samplers: jaxdml.data.samplers and
jaxdml.data.tuple_weights.

PML draws with numpy's global RNG, so its batches cannot equal ours: both
are held to the invariants PML's code guarantees (class balance, super-class
tuples per epoch, valid triplets, batch sizes), on the same labels. Where PML
is deterministic given the data (TuplesToWeightsSampler's weights of a
mined set), the weights are compared with PML's on the same embeddings.
"""
import collections
import contextlib
import glob
import itertools
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import samplers as pml_samplers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from jaxdml import config as config_lib
from jaxdml import data
from jaxdml.data import pipeline
from jaxdml.data import samplers
from jaxdml.data import synthetic
from jaxdml.data import tuple_weights
from jaxdml.losses import miners

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_categories=6, photos_per_category=8, sketches_per_photo=2,
             test_photos_per_category=2, image_size=32, seed=0)


@contextlib.contextmanager
def _pml_seed(seed):
  """PML draws from numpy's global RNG: seed it, and put it back after."""
  state = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(state)


# ---------------------------------------------------------------- m per class
def test_m_per_class_draws_are_those_of_before():
  # Recorded before the class draw became a helper shared with the
  # hierarchical sampler: every m-per-class recipe's batches stay the same.
  labels = np.repeat(np.arange(10), [2, 7, 5, 4, 9, 3, 6, 8, 5, 4]) + 100
  want = {0: [28, 29, 27, 28, 1, 0, 1, 0, 14, 15, 16, 17, 45, 47, 44, 48],
          7: [4, 5, 8, 3, 51, 50, 49, 52, 0, 0, 0, 1, 16, 17, 14, 15]}
  for step, rows in want.items():
    np.testing.assert_array_equal(
        samplers.m_per_class_batch_indices(labels, m=4, batch_size=16, seed=3, step=step), rows)
    np.testing.assert_array_equal(samplers.MPerClass(labels, 4, 16, seed=3).batch(step), rows)


def test_m_per_class_object_steps_epochs_and_errors():
  labels = np.repeat(np.arange(12), [2, 7, 5, 4, 9, 3, 6, 8, 5, 4, 6, 6])
  sampler = samplers.MPerClass(labels, 4, 16, seed=5, length_before_new_iter=400, start_step=7)
  pml = pml_samplers.MPerClassSampler(labels, m=4, batch_size=16, length_before_new_iter=400)
  assert len(sampler) * 16 == len(pml) == 400  # PML's length is in samples
  first = list(itertools.islice(sampler, 3))  # steps 7, 8, 9
  for step, rows in zip(range(7, 10), first):
    np.testing.assert_array_equal(rows, samplers.m_per_class_batch_indices(
        labels, m=4, batch_size=16, seed=5, step=step))
  epoch1 = list(sampler.epoch(1))
  assert len(epoch1) == 25
  np.testing.assert_array_equal(epoch1[0], sampler.batch(25))
  for rows in epoch1:
    lab = labels[rows].reshape(4, 4)
    assert (lab == lab[:, :1]).all() and len(np.unique(lab[:, 0])) == 4
  assert not np.array_equal(samplers.MPerClass(labels, 4, 16, seed=6).batch(7), first[0])
  with pytest.raises(ValueError, match="length_before_new_iter"):
    samplers.MPerClass(labels, 4, 16, length_before_new_iter=8)
  with pytest.raises(ValueError, match="only 12 classes"):
    samplers.MPerClass(labels, 1, 16)


# ---------------------------------------------------------------- hierarchical
def _hierarchical_labels(seed=0):
  """[N, 3]: (inner, junk, outer); inner labels repeat across super-classes,
  class sizes vary (some below samples_per_class)."""
  rng = np.random.default_rng(seed)
  rows = []
  for outer, num_classes in zip((3, 5, 8, 9), (6, 4, 5, 7)):
    for inner in range(num_classes):
      rows += [(inner, rng.integers(9), outer)] * int(rng.integers(2, 9))
  return np.asarray(rows)[rng.permutation(len(rows))]


def _check_hierarchical_batch(labels, rows, *, batch_size, k, m, inner, outer):
  """The structure PML guarantees, rows in any order: k super-classes of
  batch_size / k rows each, whole classes of m rows, classes distinct."""
  assert len(rows) == batch_size
  supers = collections.Counter(labels[rows, outer].tolist())
  assert len(supers) == k and set(supers.values()) == {batch_size // k}
  classes = collections.Counter(zip(labels[rows, outer].tolist(), labels[rows, inner].tolist()))
  assert set(classes.values()) == {m}
  for (o, i), _ in classes.items():  # no repeats unless the class is too small
    mine = rows[(labels[rows, outer] == o) & (labels[rows, inner] == i)]
    size = np.sum((labels[:, outer] == o) & (labels[:, inner] == i))
    assert len(np.unique(mine)) == m if size >= m else len(np.unique(mine)) <= size
  return tuple(sorted(supers))


@pytest.mark.parametrize("settings", [
    dict(batch_size=16, samples_per_class=4),  # PML's defaults otherwise
    dict(batch_size=18, samples_per_class=2, batches_per_super_tuple=2,
         super_classes_per_batch=3)])
def test_hierarchical_balance_and_super_tuples_per_epoch_as_pml(settings):
  labels = _hierarchical_labels()
  k = settings.get("super_classes_per_batch", 2)
  per_tuple = settings.get("batches_per_super_tuple", 4)
  kw = dict(inner_label=0, outer_label=2, **settings)
  check = lambda rows: _check_hierarchical_batch(
      labels, np.asarray(rows), batch_size=settings["batch_size"], k=k,
      m=settings["samples_per_class"], inner=0, outer=2)
  sampler = samplers.Hierarchical(labels, seed=4, **kw)
  with _pml_seed(0):
    pml = pml_samplers.HierarchicalSampler(labels, **kw)
    pml_epoch = list(pml)
  assert len(sampler) == len(pml) == math.comb(4, k) * per_tuple
  want = collections.Counter({t: per_tuple for t in itertools.combinations((3, 5, 8, 9), k)})
  for batches in (pml_epoch, list(sampler.epoch(0)), list(sampler.epoch(3))):
    assert collections.Counter(check(rows) for rows in batches) == want
  for step in (0, 5, len(sampler) + 2):
    np.testing.assert_array_equal(sampler.batch(step), samplers.hierarchical_batch_indices(
        labels, seed=4, step=step, **kw))
  other = samplers.Hierarchical(labels, seed=5, **kw)
  assert not all(np.array_equal(sampler.batch(s), other.batch(s)) for s in range(3))


def test_hierarchical_classes_within_a_super_class_are_uniform():
  labels = _hierarchical_labels()
  sampler = samplers.Hierarchical(labels, 8, 2, inner_label=0, outer_label=2, seed=1)
  picked = collections.Counter()
  for step in range(600):
    rows = sampler.batch(step)[::2]  # one row per class
    picked.update(zip(labels[rows, 2].tolist(), labels[rows, 0].tolist()))
  for outer, num_classes in zip((3, 5, 8, 9), (6, 4, 5, 7)):
    freq = np.array([picked[(outer, c)] for c in range(num_classes)], float)
    freq /= freq.sum()
    assert np.abs(freq - 1 / num_classes).max() < 0.05, (outer, freq)


def test_hierarchical_impossible_requests_raise():
  labels = _hierarchical_labels()
  kw = dict(inner_label=0, outer_label=2)
  with pytest.raises(ValueError, match="positive int; PML's 'all'"):
    samplers.Hierarchical(labels, 16, "all", **kw)
  with pytest.raises(ValueError, match="multiple of super_classes_per_batch"):
    samplers.Hierarchical(labels, 12, 4, **kw)
  with pytest.raises(ValueError, match="4 super-classes; lower super_classes_per_batch"):
    samplers.Hierarchical(labels, 15, 1, super_classes_per_batch=5, **kw)
  # 2 super-classes x 5 classes of 2: the super-class with 4 classes falls short.
  with pytest.raises(ValueError, match=r"super-classes \[5\] have fewer; lower batch_size"):
    samplers.Hierarchical(labels, 20, 2, **kw)
  with pytest.raises(ValueError, match="int array \\[N, levels\\]"):
    samplers.hierarchy(labels[:, 0])


def test_combination_unranking_is_itertools_order():
  for n in range(1, 7):
    for k in range(1, n + 1):
      combos = list(itertools.combinations(range(n), k))
      assert [tuple(samplers._combination(i, n, k)) for i in range(len(combos))] == combos


# ---------------------------------------------------------------- fixed triplets
def _assert_valid_triplets(labels, triplets):
  a, p, n = np.asarray(triplets).T
  assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
  assert (a != p).all()


def test_fixed_set_of_triplets_valid_seeded_and_each_once_an_epoch():
  labels = np.repeat(np.arange(7), [1, 5, 2, 6, 3, 1, 4])  # classes 0, 5: one row
  sampler = samplers.FixedSetOfTriplets(labels, 40, 12, seed=2)
  assert sampler.triplets.shape == (40, 3)
  _assert_valid_triplets(labels, sampler.triplets)
  assert not np.isin(sampler.triplets[:, 0], np.flatnonzero(np.isin(labels, (0, 5)))).any()
  assert set(labels[sampler.triplets[:, 2]]) == set(range(7))  # any other class is a negative
  no_singletons = np.repeat(np.arange(5), [2, 5, 3, 6, 4])
  with _pml_seed(0):
    pml = pml_samplers.FixedSetOfTriplets(no_singletons, 40)
    pml_flat = np.asarray(list(pml))
  assert len(pml) == 120 and len(samplers.FixedSetOfTriplets(no_singletons, 40, 12)) == 10
  for triplets in (pml_flat.reshape(-1, 3), samplers.fixed_triplets(no_singletons, num_triplets=40,
                                                                    seed=0)):
    _assert_valid_triplets(no_singletons, triplets)
  np.testing.assert_array_equal(
      sampler.triplets, samplers.fixed_triplets(labels, num_triplets=40, seed=2))
  assert not np.array_equal(sampler.triplets,
                            samplers.fixed_triplets(labels, num_triplets=40, seed=3))
  for e in range(2):
    batches = list(sampler.epoch(e))
    assert len(batches) == len(sampler) == 10 and all(len(b) == 12 for b in batches)
    seen = np.concatenate(batches).reshape(-1, 3)
    assert sorted(map(tuple, seen)) == sorted(map(tuple, sampler.triplets))
  assert not np.array_equal(sampler.batch(0), sampler.batch(10))  # epochs reshuffle
  with_rest = samplers.FixedSetOfTriplets(labels, 41, 12, seed=2)  # one triplet sits out
  seen = collections.Counter(map(tuple, np.concatenate(list(with_rest.epoch(0))).reshape(-1, 3)))
  assert seen.total() == 40 and not seen - collections.Counter(map(tuple, with_rest.triplets))


def test_fixed_set_of_triplets_impossible_requests_raise():
  labels = np.repeat(np.arange(4), 3)
  with pytest.raises(ValueError, match="positive multiple of 3"):
    samplers.FixedSetOfTriplets(labels, 10, 8)
  with pytest.raises(ValueError, match="raise num_triplets or lower batch_size"):
    samplers.FixedSetOfTriplets(labels, 3, 12)
  with pytest.raises(ValueError, match="1 classes, 1 with two rows"):
    samplers.fixed_triplets(np.zeros(5, int), num_triplets=4, seed=0)
  with pytest.raises(ValueError, match="4 classes, 0 with two rows"):
    samplers.fixed_triplets(np.arange(4), num_triplets=4, seed=0)


# ---------------------------------------------------------------- tuples to weights
def _clusters(n=40, num_classes=5, dim=8, seed=0, spread=0.7):
  """Raw embeddings: noisy class centres, rows of varied norm."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % num_classes)
  x = rng.normal(size=(num_classes, dim))[labels] + spread * rng.normal(size=(n, dim))
  return x * rng.uniform(0.3, 3.0, size=(n, 1)), labels


def _pml_weights(miner, x, labels):
  y = torch.tensor(labels)
  return lmu.convert_to_weights(miner(torch.tensor(x, dtype=torch.float64), y), y,
                                dtype=torch.float32).numpy()


# (ours, PML's): defaults, and non-default settings, pair and triplet miners.
MINERS = [
    ("multi_similarity", pml_miners.MultiSimilarityMiner()),
    (dict(name="multi_similarity", epsilon=0.3, distance=dict(name="euclidean",
                                                             normalize_embeddings=False)),
     pml_miners.MultiSimilarityMiner(epsilon=0.3, distance=pml_distances.LpDistance(
         normalize_embeddings=False))),
    (miners.triplet_margin, pml_miners.TripletMarginMiner()),
    (dict(name="triplet_margin", margin=0.5, type_of_triplets="semihard",
          distance=dict(name="lp", p=1)),
     pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard",
                                   distance=pml_distances.LpDistance(p=1))),
    ("batch_hard", pml_miners.BatchHardMiner()),
    ("batch_easy_hard", pml_miners.BatchEasyHardMiner()),
    (dict(name="pair_margin", pos_margin=0.9, neg_margin=1.3),
     pml_miners.PairMarginMiner(pos_margin=0.9, neg_margin=1.3)),
]


@pytest.mark.parametrize("ours,pml", MINERS)
def test_tuple_weights_are_pmls_weights(ours, pml):
  x, labels = _clusters()
  embed = lambda rows: jnp.asarray(x[rows], jnp.float32)
  got = tuple_weights.tuple_weights(embed, labels, miner=ours, seed=0, epoch=0)
  want = _pml_weights(pml, x, labels)
  assert len(np.unique(want)) > 2  # weights that vary: a real test
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # On a subset: PML's weights of the subset's rows, 0 elsewhere.
  sub = tuple_weights.tuple_weights(embed, labels, miner=ours, seed=0, epoch=3, subset_size=24)
  rows = np.sort(np.random.default_rng([0, samplers.TUPLE_SUBSET, 3]).choice(40, 24, replace=False))
  np.testing.assert_allclose(sub[rows], _pml_weights(pml, x[rows], labels[rows]), rtol=1e-6)
  assert (np.delete(sub, rows) == 0).all()


def test_tuple_weights_without_tuples_weigh_the_subset_evenly_as_pml():
  x, labels = _clusters(spread=0.01)
  got = tuple_weights.tuple_weights(
      lambda rows: x[rows], labels, miner=dict(name="triplet_margin", type_of_triplets="hard"),
      seed=1, epoch=0, subset_size=30)
  assert sorted(np.unique(got)) == [0.0, 1.0] and got.sum() == 30
  np.testing.assert_array_equal(
      _pml_weights(pml_miners.TripletMarginMiner(type_of_triplets="hard"), x, labels), 1.0)


def test_tuples_to_weights_sampler_is_pure_in_seed_and_step():
  x, labels = _clusters()
  calls = []

  def embed(rows):
    calls.append(len(rows))
    return x[rows]

  kw = dict(miner="batch_hard", subset_size=32)
  sampler = tuple_weights.TuplesToWeights(embed, labels, batch_size=8, seed=3, **kw)
  assert len(sampler) == 4
  epoch0 = list(sampler.epoch(0))
  assert calls == [32]  # embedded and mined once an epoch
  zero = np.flatnonzero(sampler.weights == 0)
  assert zero.size and not np.isin(np.concatenate(epoch0), zero).any()
  resumed = tuple_weights.TuplesToWeights(embed, labels, batch_size=8, seed=3, start_step=2, **kw)
  np.testing.assert_array_equal(next(iter(resumed)), epoch0[2])
  np.testing.assert_array_equal(
      tuple_weights.tuples_to_weights_batch_indices(embed, labels, batch_size=8, seed=3, step=6,
                                                    **kw), sampler.batch(6))
  other = tuple_weights.TuplesToWeights(embed, labels, batch_size=8, seed=4, **kw)
  assert not np.array_equal(other.batch(0), epoch0[0])
  sampled = tuple_weights.tuple_weights(embed, labels, miner="distance_weighted", seed=3, epoch=0)
  np.testing.assert_array_equal(sampled, tuple_weights.tuple_weights(
      embed, labels, miner="distance_weighted", seed=3, epoch=0))
  assert sampled.max() == 1.0 and (sampled > 0).sum() > 20
  with pytest.raises(ValueError, match="subset_size \\(50\\) must be in \\[1, 40\\]"):
    tuple_weights.tuple_weights(embed, labels, miner="batch_hard", seed=0, epoch=0, subset_size=50)
  with pytest.raises(ValueError, match="batch_size \\(40\\) must be in \\[1, 32\\]"):
    tuple_weights.TuplesToWeights(embed, labels, batch_size=40, seed=3, **kw)
  with pytest.raises(ValueError, match="Unknown miner 'hardest'"):
    tuple_weights.TuplesToWeights(embed, labels, "hardest", 8)
  with pytest.raises(ValueError, match="\\[len\\(rows\\), D\\]"):
    tuple_weights.tuple_weights(lambda rows: x, labels, miner="batch_hard", seed=0, epoch=0,
                                subset_size=8)


def test_weighted_batches_follow_the_weights():
  weights = np.array([0.0, 1.0, 0.5, 0.0, 0.25, 0.25])
  drawn = np.concatenate([samplers.weighted_batch_indices(weights, batch_size=16, seed=0, step=s)
                          for s in range(500)])
  freq = np.bincount(drawn, minlength=6) / len(drawn)
  np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.02)
  with pytest.raises(ValueError, match="positive sum"):
    samplers.weighted_batch_indices(np.zeros(3), batch_size=2, seed=0, step=0)
  with pytest.raises(ValueError, match="non-negative"):
    samplers.weighted_batch_indices(np.array([1.0, -1.0]), batch_size=2, seed=0, step=0)


# ---------------------------------------------------------------- config
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic_cache"))


def _data_config(cache_dir, **overrides):
  cfg = data.default_data_config()
  cfg.cache_dir, cfg.synthetic, cfg.image_size = cache_dir, dict(SMALL), 32
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def _plan_rows(cfg, batch_size, seed, steps):
  indices, _, _ = pipeline._single_plan(cfg, pipeline._open(cfg), batch_size, seed)
  return [indices(s) for s in steps]


def test_every_single_encoder_recipe_keeps_its_m_per_class_batches(cache_dir):
  synthetic.load_or_generate(cache_dir, **SMALL)
  labels = pipeline._single_split(_data_config(cache_dir), pipeline._open(
      _data_config(cache_dir)))[1]
  recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "[a-z]*.py")))
  assert len(recipes) > 10
  for path in recipes:
    config = config_lib.load_config(path, "smoke")
    assert config.data.sampler.to_dict() == {"name": "m_per_class"}, path
    if config.task != "single" or config.data.single_labels != "category":
      continue
    cfg = _data_config(cache_dir, m_per_class=config.data.m_per_class)
    for step, rows in zip((0, 9), _plan_rows(cfg, 12, 7, (0, 9))):
      np.testing.assert_array_equal(rows, samplers.m_per_class_batch_indices(
          labels, m=config.data.m_per_class, batch_size=12, seed=7, step=step))


def test_config_chooses_the_sampler(cache_dir):
  spec = dict(name="hierarchical", super_label="category", samples_per_class=3)
  cfg = _data_config(cache_dir, single_labels="instance", sampler=spec)
  splits = pipeline._open(cfg)
  source, labels = pipeline._single_split(cfg, splits)
  category = source.field("category")
  for rows in _plan_rows(cfg, 12, 1, range(3)):  # 2 categories x 2 photos x 3 images
    _check_hierarchical_batch(np.stack([labels, category], 1), rows, batch_size=12, k=2, m=3,
                              inner=0, outer=1)
  cfg.sampler = dict(name="fixed_set_of_triplets", num_triplets=30)
  for rows in _plan_rows(cfg, 12, 1, range(3)):
    _assert_valid_triplets(labels, rows.reshape(-1, 3))
  batch = next(data.train_batches(cfg, seed=1, global_batch_size=12, start_step=2, task="single"))
  np.testing.assert_array_equal(batch["label"], labels[_plan_rows(cfg, 12, 1, [2])[0]])
  plain = cfg.to_dict()  # a plain dict config may name the sampler alone
  plain["sampler"] = "fixed_set_of_triplets"
  with pytest.raises(ValueError, match="needs num_triplets"):
    _plan_rows(plain, 12, 1, [0])
  for bad, match in [("random", "not one of"), ("tuples_to_weights", "needs the model"),
                     (dict(name="m_per_class", m=2), "config.data.m_per_class"),
                     (dict(name="hierarchical"), "needs super_label")]:
    plain["sampler"] = bad
    with pytest.raises(ValueError, match=match):
      _plan_rows(plain, 12, 1, [0])
