"""Regularizers attached to a loss against PML 2.9.0's loss built with the
same regularizer: value and gradient, raw embeddings, float64 in PML."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pytorch_metric_learning import regularizers as pml_regularizers

from jaxdml import losses
from jaxdml.losses import regularizers

from test_reducers import LOSSES, compare, pml_reducer, run_ours, run_pml

# (ours, PML's) regularizer; each with its PML defaults, then a non-default setting
# (hyperparameters or its own reducer).
REGULARIZERS = [
    ({"name": "lp"}, lambda: pml_regularizers.LpRegularizer()),
    ({"name": "lp", "p": 1, "power": 2, "reduction": "sum"},
     lambda: pml_regularizers.LpRegularizer(p=1, power=2, reducer=pml_reducer("sum"))),
    ({"name": "zero_mean"}, lambda: pml_regularizers.ZeroMeanRegularizer()),
    ({"name": "zero_mean", "reduction": {"name": "threshold", "low": 0.5}},
     lambda: pml_regularizers.ZeroMeanRegularizer(
         reducer=pml_reducer({"name": "threshold", "low": 0.5}))),
    ({"name": "center_invariant"}, lambda: pml_regularizers.CenterInvariantRegularizer()),
    ({"name": "center_invariant", "reduction": "sum"},
     lambda: pml_regularizers.CenterInvariantRegularizer(reducer=pml_reducer("sum"))),
    ({"name": "regular_face"}, lambda: pml_regularizers.RegularFaceRegularizer()),
    ({"name": "regular_face", "reduction": "avg_nonzero"},
     lambda: pml_regularizers.RegularFaceRegularizer(reducer=pml_reducer("avg_nonzero"))),
]
# Sparse centres regularise class vectors grouped by class: 6 rows as 3 classes x 2.
SPARSE = [({"name": "sparse_centers", "num_classes": 3, "centers_per_class": 2},
           lambda: pml_regularizers.SparseCentersRegularizer(3, 2)),
          ({"name": "sparse_centers", "num_classes": 2, "centers_per_class": 3,
            "reduction": "mean"},
           lambda: pml_regularizers.SparseCentersRegularizer(2, 3, reducer=pml_reducer("mean")))]


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 8)) * rng.uniform(0.3, 4.0, size=(16, 1)) + 0.3
  labels = rng.permutation(np.arange(16) % 4)
  return x.astype(np.float32), labels.astype(np.int32), rng.normal(size=(6, 8)).astype(
      np.float32)


def _id(case):
  return "-".join(str(v) for v in case[0].values())


@pytest.mark.parametrize("loss", ["contrastive", "arcface"])
@pytest.mark.parametrize("case", REGULARIZERS, ids=[_id(c) for c in REGULARIZERS])
def test_an_embedding_regularizer_equals_pmls(loss, case):
  ours, pml = case
  x, labels, proxies = _batch(len(_id(case)))
  want = run_pml(loss, dict(embedding_regularizer=pml(), embedding_reg_weight=0.5), None, x,
                 labels, proxies)
  got = run_ours(loss, {}, x, labels, proxies, embedding_regularizer=ours,
                 embedding_reg_weight=0.5)
  compare(loss, got, want)
  plain = run_ours(loss, {}, x, labels, proxies)[0][0]
  reg = got[0][1]["embedding_reg_loss"]
  assert reg != 0, "the case must exercise the regularizer"
  np.testing.assert_allclose(got[0][0], plain + reg, rtol=1e-6)


@pytest.mark.parametrize("case", REGULARIZERS + SPARSE, ids=[_id(c) for c in REGULARIZERS + SPARSE])
def test_a_weight_regularizer_equals_pmls(case):
  ours, pml = case
  x, labels, proxies = _batch(len(_id(case)) + 1)
  want = run_pml("arcface", dict(weight_regularizer=pml(), weight_reg_weight=2.0), None, x,
                 labels, proxies)
  got = run_ours("arcface", {}, x, labels, proxies, weight_regularizer=ours,
                 weight_reg_weight=2.0)
  assert got[0][1]["weight_reg_loss"] != 0, "the case must exercise the regularizer"
  compare("arcface", got, want)


def test_both_regularizers_with_a_reducer_equal_pmls():
  x, labels, proxies = _batch(5)
  pml_hp = dict(embedding_regularizer=pml_regularizers.ZeroMeanRegularizer(),
                weight_regularizer=pml_regularizers.RegularFaceRegularizer())
  want = run_pml("proxy_anchor", pml_hp, pml_reducer("mean"), x, labels, proxies)
  got = run_ours("proxy_anchor", {}, x, labels, proxies, reduction="mean",
                 embedding_regularizer="zero_mean", weight_regularizer="regular_face")
  compare("proxy_anchor", got, want)
  assert set(got[0][1]) >= {"embedding_reg_loss", "weight_reg_loss", "pos_loss", "neg_loss"}


def test_do_nothing_lists_the_regularizers_as_already_reduced():
  x, labels, proxies = _batch(6)
  got, _, _ = run_ours("contrastive", {}, x, labels, proxies, reduction="do_nothing",
                       embedding_regularizer="lp")
  value, aux = got
  assert set(value) == {"pos_loss", "neg_loss", "embedding_reg_loss"}
  assert value["embedding_reg_loss"]["reduction_type"] == "already_reduced"
  np.testing.assert_allclose(value["embedding_reg_loss"]["losses"], aux["embedding_reg_loss"])


def test_bad_regularizers_are_one_clear_error():
  x, labels, proxies = _batch(7)
  with pytest.raises(ValueError, match="unknown regularizer 'l3'"):
    run_ours("contrastive", {}, x, labels, proxies, embedding_regularizer={"name": "l3"})
  with pytest.raises(ValueError, match="takes no \\['q'\\]"):
    run_ours("contrastive", {}, x, labels, proxies, embedding_regularizer={"name": "lp", "q": 1})
  with pytest.raises(ValueError, match="needs \\['num_classes', 'centers_per_class'\\]"):
    run_ours("arcface", {}, x, labels, proxies, weight_regularizer="sparse_centers")
  with pytest.raises(ValueError, match="not num_classes=4"):
    run_ours("arcface", {}, x, labels, proxies,
             weight_regularizer={"name": "sparse_centers", "num_classes": 4,
                                 "centers_per_class": 2})
  # A loss without class vectors takes no weight regularizer, as in PML.
  with pytest.raises(TypeError, match="weight_regularizer"):
    losses.make("contrastive", weight_regularizer="lp")


def test_the_registry_stays_importable_without_running_jax():
  # The call path adds the keywords to every loss's signature for make().
  fn = losses.make("arcface", weight_regularizer={"name": "lp"}, embedding_regularizer="lp")
  assert callable(fn)
  assert regularizers.parse("lp") == {"name": "lp", "reduction": "mean", "p": 2.0, "power": 1.0}


def test_the_regularized_loss_stays_jittable():
  x, labels, _ = _batch(8)
  fn = jax.jit(losses.make("contrastive", with_aux=False, embedding_regularizer="center_invariant"))
  want = losses.get("contrastive")(embeddings=x, labels=labels,
                                   embedding_regularizer="center_invariant")[0]
  np.testing.assert_allclose(fn(jnp.asarray(x), labels=jnp.asarray(labels)), want, rtol=1e-6)


def test_get_returns_one_function_per_loss():
  # jax.jit caches by function: a fresh wrapper per call would retrace every time.
  assert losses.get("contrastive") is losses.get("contrastive")
