"""Pair and list losses against PML 2.9.0 on the same arrays: angular, nca,
ranked_list, instance (jaxdml.losses.listwise), histogram, pnp,
intra_pair_variance, threshold_consistent_margin
(jaxdml.losses.similarity_distributions) and snr_contrastive.

PML runs in float64, ours in float32, on raw rows (norms 0.3 to 4, which
the losses' distances normalise, so gradients go through the
normalisation). Each loss is checked at PML's defaults and at a non-default
setting, value and gradient w.r.t. the embeddings (and the reference set),
on: a random batch, a class with one sample, duplicated rows, a reference
set (PML's `ref_emb`, with extra slots masked by `ref_valid` on our side)
and a miner's selection (PML's loss fed by the same PML miner).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from jaxdml import losses
from jaxdml.losses import miners

# name -> (PML class, settings, takes a reference set, takes a miner's selection)
LOSSES = {
    "angular": (pml_losses.AngularLoss, [{}, dict(alpha=30.0)], True, True),
    "nca": (pml_losses.NCALoss, [{}, dict(softmax_scale=4.0, distance="cosine")], True, False),
    "ranked_list": (pml_losses.RankedListLoss, [
        dict(margin=0.4, Tn=10.0),
        dict(margin=0.8, Tn=4.0, Tp=2.0, imbalance=0.3, alpha=1.1)], False, False),
    "instance": (pml_losses.InstanceLoss, [{}, dict(gamma=8.0)], False, False),
    "histogram": (pml_losses.HistogramLoss, [{}, dict(n_bins=8)], False, True),
    "pnp": (pml_losses.PNPLoss, [{}, dict(variant="Ds"), dict(variant="Dq", alpha=2.0),
                                 dict(variant="Iu", anneal=0.1),
                                 dict(variant="Ib", b=3.0, anneal=0.05)], False, False),
    "intra_pair_variance": (pml_losses.IntraPairVarianceLoss,
                            [{}, dict(pos_eps=0.05, neg_eps=0.1, distance="euclidean")],
                            True, True),
    "snr_contrastive": (pml_losses.SignalToNoiseRatioContrastiveLoss,
                        [{}, dict(pos_margin=0.1, neg_margin=0.8)], True, True),
    "threshold_consistent_margin": (pml_losses.ThresholdConsistentMarginLoss, [
        {}, dict(lambda_plus=2.0, lambda_minus=0.5, margin_plus=0.8, margin_minus=0.3)],
                                    True, True),
}
PML_DISTANCES = {"cosine": pml_distances.CosineSimilarity, "euclidean": pml_distances.LpDistance}
# A pair miner (PML returns a1, p, a2, n) and a triplet miner (a, p, n).
MINERS = {
    "multi_similarity": (pml_miners.MultiSimilarityMiner, {}),
    "triplet_margin": (pml_miners.TripletMarginMiner, dict(margin=0.2,
                                                           type_of_triplets="semihard")),
}
CASES = ["random", "one_sample", "ties", "reference_set", "mined"]
# Duplicated rows put the positive pairs exactly on snr_contrastive's default
# hinge (SNR 0, pos_margin 0), where AvgNonZero's count jumps: PML's exact
# zero is not counted, float32's 1e-7 is. The mean reducer has no jump.
TIES_SETTINGS = {"snr_contrastive": [dict(reduction="mean"),
                                     dict(pos_margin=0.1, neg_margin=0.8)]}
INVALID_SLOTS = 3


def _inputs(case, seed, n=12, dim=8):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % 4)
  if case == "one_sample":
    labels[0] = 4
  x = rng.normal(size=(n, dim)) * rng.uniform(0.3, 4.0, size=(n, 1))
  if case == "ties":
    x[n // 2:] = x[:n // 2]
    labels[n // 2:] = labels[:n // 2]
  ref = rng.normal(size=(9, dim)) * rng.uniform(0.3, 4.0, size=(9, 1))
  ref_labels = rng.integers(0, 5, 9)
  return x.astype(np.float32), labels.astype(np.int32), ref.astype(np.float32), ref_labels


class _HistogramWithTopNode(pml_losses.HistogramLoss):
  """PML's HistogramLoss with a node past similarity 1: a duplicate row's
  similarity of exactly 1 puts weight 0 there, where PML's scatter indexes
  past its histogram and fails. The rest is PML's compute_density."""

  def compute_density(self, distances):
    lower = torch.floor((distances.float() + 1) / self.delta).long()
    to_upper = (distances + 1 - lower * self.delta) / self.delta
    to_lower = ((lower + 1) * self.delta - 1 - distances) / self.delta
    density = torch.zeros(round(1 + 2 / self.delta) + 1, dtype=distances.dtype)
    density.scatter_add_(0, lower + 1, to_upper)
    density.scatter_add_(0, lower, to_lower)
    return density[:-1] / distances.size(0)


def _pml_loss(name, hp, case=None):
  hp = dict(hp)
  if "distance" in hp:
    hp["distance"] = PML_DISTANCES[hp["distance"]]()
  if hp.pop("reduction", None) == "mean":
    hp["reducer"] = pml_reducers.MeanReducer()
  if name == "histogram" and case == "ties":
    return _HistogramWithTopNode(**hp)
  return LOSSES[name][0](**hp)


def _pml(loss_fn, x, labels, ref=None, ref_labels=None, miner=None):
  """PML's value and its gradients w.r.t. the embeddings (and ref), float64."""
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  yt = torch.tensor(labels, dtype=torch.long)
  inputs, kwargs = [xt], {}
  if ref is not None:
    rt = torch.tensor(ref, dtype=torch.float64, requires_grad=True)
    inputs.append(rt)
    kwargs = dict(ref_emb=rt, ref_labels=torch.tensor(ref_labels, dtype=torch.long))
  indices = None if miner is None else miner(xt.detach(), yt)
  value = loss_fn(xt, yt, indices, **kwargs)
  grads = torch.autograd.grad(value, inputs, allow_unused=True)
  return value.item(), [np.zeros(t.shape) if g is None else g.numpy()
                        for g, t in zip(grads, inputs)]


def _tcm_against_reference_set(hp, x, labels, ref, ref_labels):
  """PML's TCM looks `ref_emb` indices up in the batch; its two parts are
  PML's ContrastiveLoss parts with cosine (each isolated by a margin that
  silences the other), which pair with `ref_emb` properly."""
  margin_plus, margin_minus = hp.get("margin_plus", 0.9), hp.get("margin_minus", 0.5)
  value, grads = 0.0, 0.0
  for weight, pos_margin, neg_margin in ((hp.get("lambda_plus", 1.0), margin_plus, 2.0),
                                         (hp.get("lambda_minus", 1.0), -2.0, margin_minus)):
    part, part_grads = _pml(pml_losses.ContrastiveLoss(
        pos_margin=pos_margin, neg_margin=neg_margin,
        distance=pml_distances.CosineSimilarity()), x, labels, ref, ref_labels)
    value = value + weight * part
    grads = [weight * g + (0.0 if isinstance(grads, float) else h)
             for g, h in zip(part_grads, grads if isinstance(grads, list) else part_grads)]
  return value, grads


def _close(value, grads, want, want_grads, msg):
  np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-6, err_msg=msg)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * max(np.abs(w).max(), 1e-6),
                               err_msg=msg)


def _cases():
  for name, (_, _, takes_ref, takes_mined) in sorted(LOSSES.items()):
    for case in CASES:
      if case == "reference_set" and not takes_ref:
        continue
      if case == "mined" and not takes_mined:
        continue
      yield name, case


@pytest.mark.parametrize("name,case", list(_cases()))
def test_losses_equal_pml(name, case):
  seed = sorted(LOSSES).index(name) * 10 + CASES.index(case)
  x, labels, ref, ref_labels = _inputs(case, seed)
  settings = TIES_SETTINGS.get(name, LOSSES[name][1]) if case == "ties" else LOSSES[name][1]
  for hp in settings:
    msg = f"{name} {case} {hp}"
    fn = functools.partial(losses.get(name), labels=jnp.asarray(labels), **hp)
    if case == "reference_set":
      # Our reference set carries extra slots, masked: they change nothing.
      rng = np.random.default_rng(seed + 1)
      padded = np.concatenate([ref, 50 * rng.normal(size=(INVALID_SLOTS, ref.shape[1]))])
      valid = np.arange(len(padded)) < len(ref)
      padded_labels = np.concatenate([ref_labels, labels[:INVALID_SLOTS]])
      value, (dx, dr) = jax.value_and_grad(
          lambda e, r: fn(embeddings=e, ref_embeddings=r, ref_labels=jnp.asarray(padded_labels),
                          ref_valid=jnp.asarray(valid))[0], argnums=(0, 1))(
                              jnp.asarray(x), jnp.asarray(padded, jnp.float32))
      assert not np.any(dr[~valid]), msg
      grads = [dx, dr[valid]]
      if name == "threshold_consistent_margin":
        want, want_grads = _tcm_against_reference_set(hp, x, labels, ref, ref_labels)
      else:
        want, want_grads = _pml(_pml_loss(name, hp), x, labels, ref, ref_labels)
      assert want > 0, "the case must exercise the loss"
      _close(value, grads, want, want_grads, msg)
    elif case == "mined":
      for miner_name, (make_miner, miner_hp) in MINERS.items():
        mine = miners.get(miner_name)
        value, dx = jax.value_and_grad(lambda e: fn(
            embeddings=e, mined=mine(embeddings=e, labels=jnp.asarray(labels), **miner_hp))[0])(
                jnp.asarray(x))
        want, want_grads = _pml(_pml_loss(name, hp), x, labels, miner=make_miner(**miner_hp))
        assert want > 0, "the case must exercise the loss"
        _close(value, [dx], want, want_grads, f"{msg} {miner_name}")
    else:
      value, dx = jax.value_and_grad(lambda e: fn(embeddings=e)[0])(jnp.asarray(x))
      want, want_grads = _pml(_pml_loss(name, hp, case), x, labels)
      assert want > 0, "the case must exercise the loss"
      _close(value, [dx], want, want_grads, msg)


def test_a_batch_without_positive_pairs_gives_pmls_value():
  """Every label distinct: the positive-pair terms vanish as in PML. PML's
  NCA averages over no anchor (NaN); ours is 0."""
  x, _, _, _ = _inputs("random", 99)
  labels = np.arange(len(x), dtype=np.int32)
  for name, (_, settings, _, _) in sorted(LOSSES.items()):
    value, dx = jax.value_and_grad(lambda e, name=name, hp=settings[0]: losses.get(name)(
        embeddings=e, labels=jnp.asarray(labels), **hp)[0])(jnp.asarray(x))
    want, want_grads = _pml(_pml_loss(name, settings[0]), x, labels)
    if name == "nca":
      assert np.isnan(want) and value == 0 and not np.any(dx)
      continue
    _close(value, [dx], want, want_grads, name)


def test_jit_with_bound_hyperparameters_and_vmap_over_batches():
  """jax.jit(functools.partial(loss, **hparams)) under jax.vmap over a
  leading axis of two batches: each equals PML on its own batch."""
  batches = [_inputs("random", 200 + i) for i in range(2)]
  stacked_x = jnp.asarray(np.stack([b[0] for b in batches]))
  stacked_y = jnp.asarray(np.stack([b[1] for b in batches]))
  for name, (_, settings, _, _) in sorted(LOSSES.items()):
    hp = settings[-1]
    jitted = jax.jit(functools.partial(losses.get(name), **hp))
    values = jax.vmap(lambda e, y, jitted=jitted: jitted(embeddings=e, labels=y)[0])(
        stacked_x, stacked_y)
    want = [_pml(_pml_loss(name, hp), x, y)[0] for x, y, _, _ in batches]
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_batch_as_its_own_reference_set_gives_the_in_batch_value():
  """ref = the batch with ref_self_index dropping each anchor's own copy:
  what a cross-batch memory holding the batch does (gradients add up over
  both roles)."""
  x, labels, _, _ = _inputs("random", 300)
  y = jnp.asarray(labels)
  for name, (_, settings, takes_ref, _) in sorted(LOSSES.items()):
    if not takes_ref:
      continue
    fn = functools.partial(losses.get(name), labels=y, **settings[-1])
    in_batch = jax.value_and_grad(lambda e, fn=fn: fn(embeddings=e)[0])(jnp.asarray(x))
    as_ref = jax.value_and_grad(lambda e, fn=fn: fn(
        embeddings=e, ref_embeddings=e, ref_labels=y,
        ref_self_index=jnp.arange(len(x)))[0])(jnp.asarray(x))
    assert in_batch[0] > 0, name
    np.testing.assert_allclose(as_ref[0], in_batch[0], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(as_ref[1], in_batch[1], rtol=1e-4,
                               atol=1e-5 * np.abs(in_batch[1]).max(), err_msg=name)


def test_bad_arguments_name_the_fix():
  e, y = jnp.ones((4, 3)), jnp.arange(4)
  kw = dict(embeddings=e, labels=y)
  for name, call, match in [
      ("histogram", dict(n_bins=10, delta=0.1), "delta = 2 / n_bins"),
      ("pnp", dict(variant="Dx"), "variant='Dx'"),
      ("ranked_list", dict(margin=0.4, Tn=1.0, imbalance=1.5), "imbalance"),
      ("snr_contrastive", dict(distance="cosine"), "not an SNR distance"),
  ]:
    with pytest.raises(ValueError, match=match):
      losses.get(name)(**kw, **call)
  for name in ("histogram", "pnp", "instance"):
    with pytest.raises(ValueError, match="takes no reference set"):
      losses.get(name)(**kw, ref_embeddings=e, ref_labels=y)
    assert losses.consumes(name) == frozenset()
  with pytest.raises(TypeError, match="margin"):  # required, as in PML
    losses.get("ranked_list")(**kw, Tn=1.0)
  for name in ("angular", "nca", "intra_pair_variance", "snr_contrastive",
               "threshold_consistent_margin"):
    assert losses.consumes(name) == frozenset({"reference_set"})
