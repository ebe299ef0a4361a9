"""Proxy, classification and softmax-pair losses against PML 2.9.0 on the same arrays.

PML runs in float64 on the same embeddings and class vectors (its `W`
[dim, C] is our `proxies` transposed); values and gradients w.r.t. the
embeddings and the class vectors must agree. Inputs cover: random batches,
a class absent from the batch, a class with one sample, and tied
(duplicate) embeddings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from jaxdml import losses
from jaxdml.losses import distances

PROXY_LOSSES = {
    "proxy_anchor": (lambda c, d, **hp: pml_losses.ProxyAnchorLoss(c, d, **hp), "proxies",
                     [{}, dict(margin=0.2, alpha=16.0)]),
    "proxy_nca": (lambda c, d, **hp: pml_losses.ProxyNCALoss(c, d, **hp), "proxies",
                  [{}, dict(softmax_scale=3.0)]),
    "normalized_softmax": (lambda c, d, **hp: pml_losses.NormalizedSoftmaxLoss(c, d, **hp), "W",
                           [{}, dict(temperature=0.2)]),
    "cosface": (lambda c, d, **hp: pml_losses.CosFaceLoss(c, d, **hp), "W",
                [{}, dict(margin=0.2, scale=16.0)]),
    "arcface": (lambda c, d, **hp: pml_losses.ArcFaceLoss(c, d, **hp), "W",
                [{}, dict(margin=10.0, scale=16.0)]),
    "subcenter_arcface": (lambda c, d, **hp: pml_losses.SubCenterArcFaceLoss(
        num_classes=c // hp.get("sub_centers", 3), embedding_size=d, **hp), "W",
        [{}, dict(sub_centers=2, margin=10.0, scale=16.0)]),
    "soft_triple": (lambda c, d, **hp: pml_losses.SoftTripleLoss(
        c // hp.get("centers_per_class", 10), d, **hp), "fc",
        [{}, dict(centers_per_class=2, la=10.0, gamma=0.5, margin=0.05)]),
}
# Centres per class of the table the tests build (6 classes of them).
PER_CLASS = {"subcenter_arcface": ("sub_centers", 3), "soft_triple": ("centers_per_class", 10)}


def _inputs(case, rng, classes=6, dim=8):
  labels = rng.permutation(np.arange(12) % 4)  # classes 4, 5 absent from the batch
  if case == "one_sample":
    labels[0] = 4  # class 4: one sample
  x = rng.normal(size=(12, dim))
  if case == "ties":
    x[6:] = x[:6]
    labels[6:] = labels[:6]
  proxies = rng.normal(size=(classes, dim))
  return x.astype(np.float32), labels.astype(np.int32), proxies.astype(np.float32)


def _pml(name, hp, x, labels, proxies):
  make, attr, _ = PROXY_LOSSES[name]
  loss_fn = make(proxies.shape[0], proxies.shape[1], **hp).double()
  transposed = attr in ("W", "fc")
  table = torch.tensor(proxies.T if transposed else proxies, dtype=torch.float64)
  getattr(loss_fn, attr).data = table.clone()
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  value = loss_fn(xt, torch.tensor(labels, dtype=torch.long))
  value.backward()
  grad_table = getattr(loss_fn, attr).grad.numpy()
  return value.item(), xt.grad.numpy(), grad_table.T if transposed else grad_table


@pytest.mark.parametrize("case", ["random", "one_sample", "ties"])
@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_proxy_losses_equal_pml(name, case):
  rng = np.random.default_rng(sorted(PROXY_LOSSES).index(name) * 7 + len(case))
  for hp in PROXY_LOSSES[name][2]:
    key, default = PER_CLASS.get(name, (None, 1))
    x, labels, proxies = _inputs(case, np.random.default_rng(rng.integers(1 << 30)),
                                 classes=6 * int(hp.get(key, default)))
    want, want_dx, want_dp = _pml(name, hp, x, labels, proxies)
    fn = lambda e, p: losses.get(name)(embeddings=e, labels=jnp.asarray(labels),
                                       loss_params={"proxies": p}, **hp)[0]
    value, (dx, dp) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(proxies))
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6, err_msg=f"{name} {hp}")
    scale = max(np.abs(want_dx).max(), np.abs(want_dp).max())
    np.testing.assert_allclose(dx, want_dx, rtol=1e-3, atol=1e-5 * scale, err_msg=f"{name} {hp}")
    np.testing.assert_allclose(dp, want_dp, rtol=1e-3, atol=1e-5 * scale, err_msg=f"{name} {hp}")


def test_init_params_make_a_class_major_table():
  for name in PROXY_LOSSES:
    params = losses.init_params(name, jax.random.key(0), num_classes=7, dim=5)
    per_class = PER_CLASS.get(name, (None, 1))[1]
    assert params["proxies"].shape == (7 * per_class, 5), name
    assert "params" in losses.consumes(name)
  # ProxyAnchor draws as PML's kaiming_normal_(fan_out): std sqrt(2 / C).
  big = losses.init_params("proxy_anchor", jax.random.key(1), num_classes=200, dim=400)
  assert np.std(big["proxies"]) == pytest.approx((2 / 200) ** 0.5, rel=0.02)
  with pytest.raises(ValueError, match="reference set"):
    losses.get("cosface")(embeddings=jnp.ones((2, 5)), labels=jnp.arange(2),
                          loss_params=params, ref_embeddings=jnp.ones((2, 5)))


# name -> (PML class, hyperparameter settings, takes a reference set, PML
# L2-normalises first with its default LpDistance: we compose with it).
PAIR_LOSSES = {
    "ntxent": (pml_losses.NTXentLoss, [{}, dict(temperature=0.5)], True, False),
    "supcon": (pml_losses.SupConLoss, [{}, dict(temperature=0.5)], True, False),
    "circle": (pml_losses.CircleLoss, [{}, dict(m=0.25, gamma=32.0)], True, False),
    "tuplet_margin": (pml_losses.TupletMarginLoss, [{}, dict(margin=10.0, scale=16.0)],
                      True, False),
    "generalized_lifted_structure": (pml_losses.GeneralizedLiftedStructureLoss,
                                     [{}, dict(pos_margin=0.1, neg_margin=0.8)], True, True),
    "lifted_structure": (pml_losses.LiftedStructureLoss,
                         [{}, dict(pos_margin=0.1, neg_margin=0.8)], False, True),
    "margin": (pml_losses.MarginLoss, [{}, dict(margin=0.1, beta=1.0)], True, True),
    "npairs": (pml_losses.NPairsLoss, [{}], False, False),
}
CASES = ["random", "one_sample", "ties", "reference_set"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_equal_pml(name, case):
  make, settings, takes_ref, normalized = PAIR_LOSSES[name]
  if case == "reference_set" and not takes_ref:
    pytest.skip(f"{name} is in-batch only (PML mixes query and reference indices)")
  rng = np.random.default_rng(len(case) + 3 * len(name))
  x, labels, _ = _inputs("random" if case == "reference_set" else case, rng)
  ref = rng.normal(size=(9, x.shape[1])).astype(np.float32)
  ref_labels = rng.integers(0, 5, 9).astype(np.int32)
  unit = distances.l2_normalize if normalized else (lambda e: e)
  for hp in settings:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    kwargs = {}
    if case == "reference_set":
      kwargs = dict(ref_emb=torch.tensor(ref, dtype=torch.float64),
                    ref_labels=torch.tensor(ref_labels, dtype=torch.long))
    want = make(**hp)(xt, torch.tensor(labels, dtype=torch.long), **kwargs)
    ours = (dict(ref_embeddings=unit(jnp.asarray(ref)), ref_labels=jnp.asarray(ref_labels))
            if kwargs else {})
    value, grad = jax.value_and_grad(lambda e: losses.get(name)(
        embeddings=unit(e), labels=jnp.asarray(labels), **ours, **hp)[0])(jnp.asarray(x))
    if name == "tuplet_margin" and case == "ties":
      # PML takes arccos of a cosine that rounds above 1 for duplicate rows:
      # NaN. Ours uses the closed form and stays finite.
      assert np.isnan(want.item()) and np.isfinite(value) and np.all(np.isfinite(grad))
      continue
    want.backward()
    assert want.item() > 0, "the case must exercise the loss"
    # Duplicate rows: PML's cdist gives distance 0 exactly, the float32
    # expansion |x|^2 + |y|^2 - 2xy about 3e-4 after the square root; value
    # and gradient get a looser tolerance there.
    rtol = 1e-4 if case == "ties" and normalized else 2e-5
    np.testing.assert_allclose(value, want.item(), rtol=rtol, atol=1e-6, err_msg=f"{name} {hp}")
    g = xt.grad.numpy()
    grad_atol = (1e-4 if case == "ties" and normalized else 1e-5) * np.abs(g).max()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=grad_atol, err_msg=f"{name} {hp}")


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("case", ["random", "reference_set"])
def test_margin_learned_beta_equals_pml(per_class, case):
  """MarginLoss(learn_beta=True, nu, num_classes): value and gradients w.r.t.
  the embeddings and beta (ours: loss_params["beta"])."""
  rng = np.random.default_rng(11 + per_class)
  x, labels, _ = _inputs("random", rng)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  betas = rng.uniform(0.8, 1.3, 6 if per_class else 1)
  pml = pml_losses.MarginLoss(margin=0.2, nu=0.3, beta=1.0, learn_beta=True,
                              num_classes=6 if per_class else None).double()
  pml.beta.data = torch.tensor(betas, dtype=torch.float64)
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  ours, kwargs = {}, {}
  if case == "reference_set":
    ref = rng.normal(size=(9, x.shape[1]))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    ref_labels = rng.integers(0, 4, 9)
    kwargs = dict(ref_emb=torch.tensor(ref), ref_labels=torch.tensor(ref_labels))
    ours = dict(ref_embeddings=jnp.asarray(ref, jnp.float32),
                ref_labels=jnp.asarray(ref_labels, jnp.int32))
  want = pml(xt, torch.tensor(labels, dtype=torch.long), **kwargs)
  want.backward()
  hp = dict(margin=0.2, nu=0.3, beta=1.0, learn_beta=True, beta_per_class=per_class)
  params = losses.init_params("margin", jax.random.key(0), num_classes=6, dim=8, **hp)
  assert params["beta"].shape == betas.shape and np.all(params["beta"] == 1.0)
  # PML's LpDistance normalises: so do we, for the same gradient.
  fn = lambda e, b: losses.get("margin")(embeddings=distances.l2_normalize(e),
                                         labels=jnp.asarray(labels),
                                         loss_params={"beta": b}, **ours, **hp)[0]
  value, (dx, db) = jax.value_and_grad(fn, argnums=(0, 1))(
      jnp.asarray(x, jnp.float32), jnp.asarray(betas, jnp.float32))
  np.testing.assert_allclose(value, want.item(), rtol=2e-5)
  np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(db, pml.beta.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert np.abs(pml.beta.grad.numpy()).max() > 0
  # Parameters only when asked for: the train state holds none otherwise.
  assert "params" in losses.consumes("margin", hp)
  assert "params" not in losses.consumes("margin", dict(margin=0.2))
  with pytest.raises(ValueError, match="learn_beta=True"):
    losses.init_params("margin", jax.random.key(0), num_classes=6, dim=8)


@pytest.mark.parametrize("case", ["random", "one_sample", "ties", "absent_positives"])
def test_fast_ap_equals_pml(case):
  rng = np.random.default_rng(len(case))
  x, labels, _ = _inputs("random" if case == "absent_positives" else case, rng)
  if case == "absent_positives":
    labels = np.arange(12, dtype=np.int32)  # no anchor has a positive: PML's 0
  for hp in ({}, dict(num_bins=5)):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = pml_losses.FastAPLoss(**hp)(xt, torch.tensor(labels, dtype=torch.long))
    fn = lambda e: losses.get("fast_ap")(embeddings=e, labels=jnp.asarray(labels), **hp)[0]
    value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
    np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6, err_msg=f"{hp}")
    if case == "absent_positives":
      assert value == 0 and not np.any(grad)
      continue
    assert want.item() > 0
    want.backward()
    g = xt.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=f"{hp}")


@pytest.mark.parametrize("case", ["random", "ties", "shuffled"])
def test_smooth_ap_equals_pml(case):
  """As many classes as samples per class (4 x 4), where PML equals the
  authors' code: ours reads the labels, so a shuffled batch equals PML on
  the same batch sorted by class."""
  rng = np.random.default_rng(5 + len(case))
  labels = np.repeat(np.arange(4), 4).astype(np.int32)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  if case == "ties":
    x[1] = x[0]
    x[9] = x[4]
  order = rng.permutation(16) if case == "shuffled" else np.arange(16)
  for hp in ({}, dict(temperature=0.1)):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = pml_losses.SmoothAPLoss(**hp)(xt, torch.tensor(labels, dtype=torch.long))
    want.backward()
    fn = lambda e: losses.get("smooth_ap")(embeddings=e, labels=jnp.asarray(labels[order]),
                                           anchor_chunk=5, **hp)[0]
    value, grad = jax.value_and_grad(fn)(jnp.asarray(x[order]))
    assert want.item() > 0
    np.testing.assert_allclose(value, want.item(), rtol=1e-4, atol=1e-6, err_msg=f"{hp}")
    g = xt.grad.numpy()[order]
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max(), err_msg=f"{hp}")


def _smooth_ap_reference(preds, num_id, anneal):
  """The Smooth-AP authors' loss (github.com/Andrew-Brown1/Smooth_AP,
  src/Smooth_AP_loss.py, `SmoothAP.forward`) in numpy float64: `preds` are
  L2-normalised rows, class by class, `num_id` classes of equal size."""
  batch_size, feat_dims = preds.shape
  group = batch_size // num_id

  def sigmoid(tensor, temp):
    exponent = np.clip(-tensor / temp, -50, 50)
    return 1.0 / (1.0 + np.exp(exponent))
  mask = np.repeat((1.0 - np.eye(batch_size))[None], batch_size, axis=0)
  sim_all = preds @ preds.T
  sim_all_repeat = np.repeat(sim_all[:, None, :], batch_size, axis=1)
  sim_diff = sim_all_repeat - sim_all_repeat.transpose(0, 2, 1)
  sim_all_rk = np.sum(sigmoid(sim_diff, anneal) * mask, axis=-1) + 1
  xs = preds.reshape(num_id, group, feat_dims)
  pos_mask = np.tile((1.0 - np.eye(group))[None, None], (num_id, group, 1, 1))
  sim_pos = xs @ xs.transpose(0, 2, 1)
  sim_pos_repeat = np.repeat(sim_pos[:, :, None, :], group, axis=2)
  sim_pos_diff = sim_pos_repeat - sim_pos_repeat.transpose(0, 1, 3, 2)
  sim_pos_rk = np.sum(sigmoid(sim_pos_diff, anneal) * pos_mask, axis=-1) + 1
  ap = 0.0
  for ind in range(num_id):
    block = slice(ind * group, (ind + 1) * group)
    pos_divide = np.sum(sim_pos_rk[ind] / sim_all_rk[block, block])
    ap = ap + ((pos_divide / group) / batch_size)
  return 1 - ap


@pytest.mark.parametrize("classes,per_class", [(4, 8), (8, 4), (4, 4)])
def test_smooth_ap_equals_the_authors_code(classes, per_class):
  """Value and gradient of the authors' code, transcribed above (gradient by
  central differences in float64), on shuffled batches. PML 2.9.0 equals it
  only with as many classes as samples per class: it reshapes the batch by
  the samples per class where the authors pass the number of classes."""
  rng = np.random.default_rng(classes * 10 + per_class)
  n = classes * per_class
  labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
  x = rng.normal(size=(n, 8))
  order = rng.permutation(n)
  for temperature in (0.01, 0.1):
    reference = lambda e: _smooth_ap_reference(
        e / np.linalg.norm(e, axis=1, keepdims=True), classes, temperature)
    want = reference(x)
    eps, want_grad = 1e-6, np.zeros_like(x)
    for i, j in np.ndindex(*x.shape):
      step = np.zeros_like(x)
      step[i, j] = eps
      want_grad[i, j] = (reference(x + step) - reference(x - step)) / (2 * eps)
    fn = lambda e: losses.get("smooth_ap")(embeddings=e, labels=jnp.asarray(labels[order]),
                                           anchor_chunk=5, temperature=temperature)[0]
    value, grad = jax.value_and_grad(fn)(jnp.asarray(x[order], jnp.float32))
    np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=f"T={temperature}")
    np.testing.assert_allclose(grad, want_grad[order], rtol=1e-3,
                               atol=1e-4 * np.abs(want_grad).max(), err_msg=f"T={temperature}")
    pml = pml_losses.SmoothAPLoss(temperature=temperature)(
        torch.tensor(x), torch.tensor(labels, dtype=torch.long)).item()
    if classes == per_class:
      assert pml == pytest.approx(want, rel=1e-6)  # PML sums the APs in float32
    else:
      assert abs(pml - want) > 1e-3
