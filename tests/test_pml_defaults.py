"""Every distance-based loss and miner, called with no hyperparameters, equals
PML 2.9.0's class of the same name called with no arguments, on raw
embeddings: rows of norms 0.3 to 4, which PML's default distances
L2-normalise first, so value and gradient go through the normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from jaxdml import losses
from jaxdml.losses import distances
from jaxdml.losses import miners

LOSSES = {
    "triplet": pml_losses.TripletMarginLoss,
    "contrastive": pml_losses.ContrastiveLoss,
    "margin": pml_losses.MarginLoss,
    "lifted_structure": pml_losses.LiftedStructureLoss,
    "generalized_lifted_structure": pml_losses.GeneralizedLiftedStructureLoss,
    "multi_similarity": pml_losses.MultiSimilarityLoss,
    "ntxent": pml_losses.NTXentLoss,
    "supcon": pml_losses.SupConLoss,
    "circle": pml_losses.CircleLoss,
    "tuplet_margin": pml_losses.TupletMarginLoss,
    "npairs": pml_losses.NPairsLoss,
    "fast_ap": pml_losses.FastAPLoss,
    "angular": pml_losses.AngularLoss,
    "histogram": pml_losses.HistogramLoss,
    "instance": pml_losses.InstanceLoss,
    "intra_pair_variance": pml_losses.IntraPairVarianceLoss,
    "nca": pml_losses.NCALoss,
    "pnp": pml_losses.PNPLoss,
    "snr_contrastive": pml_losses.SignalToNoiseRatioContrastiveLoss,
    "threshold_consistent_margin": pml_losses.ThresholdConsistentMarginLoss,
}
MINERS = {
    "batch_hard": pml_miners.BatchHardMiner,
    "batch_easy_hard": pml_miners.BatchEasyHardMiner,
    "pair_margin": pml_miners.PairMarginMiner,
    "triplet_margin": pml_miners.TripletMarginMiner,
    "multi_similarity": pml_miners.MultiSimilarityMiner,
}


def _raw_batch(seed, n=16, dim=8, classes=4):
  """A batch whose rows are far from unit length."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)) * rng.uniform(0.3, 4.0, size=(n, 1))
  labels = rng.permutation(np.arange(n) % classes)
  return x.astype(np.float32), labels.astype(np.int32)


def _compare(value, grad, want, want_grad):
  np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-4 * np.abs(want_grad).max())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_with_no_hyperparameters_is_pmls_default_on_raw_embeddings(name):
  x, labels = _raw_batch(len(name))
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  want = LOSSES[name]()(xt, torch.tensor(labels, dtype=torch.long))
  want.backward()
  assert want.item() > 0, "the case must exercise the loss"
  fn = lambda e: losses.get(name)(embeddings=e, labels=jnp.asarray(labels))[0]
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
  _compare(value, grad, want.item(), xt.grad.numpy())


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
@pytest.mark.parametrize("name", sorted(MINERS))
def test_a_miner_with_no_hyperparameters_is_pmls_default_on_raw_embeddings(name, loss):
  x, labels = _raw_batch(3 + len(name))
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  yt = torch.tensor(labels, dtype=torch.long)
  want = LOSSES[loss]()(xt, yt, MINERS[name]()(xt.detach(), yt))
  want.backward()
  assert want.item() > 0, "the case must exercise the loss"
  fn = lambda e: losses.get(loss)(
      embeddings=e, labels=jnp.asarray(labels),
      mined=miners.get(name)(embeddings=e, labels=jnp.asarray(labels)))[0]
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
  _compare(value, grad, want.item(), xt.grad.numpy())


def test_raw_rows_are_a_setting_of_the_distance():
  """`normalize_embeddings=False` compares the rows as they are, as PML's
  `LpDistance(normalize_embeddings=False)` does."""
  x, labels = _raw_batch(5)
  raw = dict(name="euclidean", normalize_embeddings=False)
  got, _ = losses.get("triplet")(embeddings=jnp.asarray(x), labels=jnp.asarray(labels),
                                 distance=raw)
  from pytorch_metric_learning import distances as pml_distances  # pylint: disable=g-import-not-at-top
  want = pml_losses.TripletMarginLoss(
      distance=pml_distances.LpDistance(normalize_embeddings=False))(
          torch.tensor(x, dtype=torch.float64), torch.tensor(labels, dtype=torch.long))
  np.testing.assert_allclose(got, want.item(), rtol=1e-4)
  normalised, _ = losses.get("triplet")(embeddings=jnp.asarray(x), labels=jnp.asarray(labels))
  assert abs(float(normalised) - float(got)) > 0.1  # the setting matters here


@pytest.mark.parametrize("spec,pml", [
    ("euclidean", lambda d: d.LpDistance()),
    ("squared_euclidean", lambda d: d.LpDistance(power=2)),
    (dict(name="lp", p=1), lambda d: d.LpDistance(p=1)),
    (dict(name="lp", p=3, power=2, normalize_embeddings=False),
     lambda d: d.LpDistance(p=3, power=2, normalize_embeddings=False)),
    ("cosine", lambda d: d.CosineSimilarity()),
    ("dot", lambda d: d.DotProductSimilarity()),
    (dict(name="dot", normalize_embeddings=False),
     lambda d: d.DotProductSimilarity(normalize_embeddings=False)),
    ("snr", lambda d: d.SNRDistance()),
    (dict(name="snr", normalize_embeddings=False),
     lambda d: d.SNRDistance(normalize_embeddings=False)),
], ids=lambda v: "pml" if callable(v) else str(v))
def test_distances_equal_pmls_matrices_and_gradients(spec, pml):
  from pytorch_metric_learning import distances as pml_distances  # pylint: disable=g-import-not-at-top
  x, _ = _raw_batch(9, n=7, dim=6)
  y, _ = _raw_batch(10, n=5, dim=6)
  weights = np.random.default_rng(0).normal(size=(7, 5))
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  mat = pml(pml_distances)(xt, torch.tensor(y, dtype=torch.float64))
  (mat * torch.tensor(weights)).sum().backward()
  ours = lambda e: distances.pairwise(e, jnp.asarray(y), distance=spec)
  np.testing.assert_allclose(ours(jnp.asarray(x)), mat.detach().numpy(), rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda e: jnp.sum(ours(e) * weights))(jnp.asarray(x))
  _compare(0.0, grad, 0.0, xt.grad.numpy())
  assert distances.is_similarity(spec) == pml(pml_distances).is_inverted


def test_a_distance_is_hashable_and_bad_settings_are_named():
  d = distances.resolve(dict(name="euclidean", normalize_embeddings=False))
  assert hash(d) == hash(distances.LpDistance(normalize_embeddings=False))
  assert d == distances.LpDistance(normalize_embeddings=False) != distances.resolve("euclidean")
  with pytest.raises(ValueError, match="'manhattan' is not supported.*euclidean"):
    distances.resolve("manhattan")
  with pytest.raises(ValueError, match="cosine' always normalises"):
    distances.resolve(dict(name="cosine", normalize_embeddings=False))
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['q'\]"):
    distances.resolve(dict(name="lp", q=1))
