"""Large-margin softmax, SphereFace, P2SGrad, Manifold, VICReg and dynamic
soft margin against PML 2.9.0 on the same arrays.

PML runs in float64 on the same raw embeddings (rows of norm 0.3 to 4) and
the same learnable tensors (its `W` / `weight` [dim, C] is our `proxies`
transposed; Manifold's `proxies` has our layout); values and gradients
w.r.t. the embeddings and the learnable tensors must agree, for PML's
defaults and for a non-default setting. DynamicSoftMargin runs several
calls in a row with its histogram carried, as PML's buffer is.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses

from jaxdml import losses
from jaxdml.losses import manifold as manifold_lib


def _raw(rng, n=12, dim=8):
  """Rows far from unit length."""
  return (rng.normal(size=(n, dim)) * rng.uniform(0.3, 4.0, size=(n, 1))).astype(np.float32)


def _close(got, want, what, rtol=1e-3):
  """Value or gradient: relative, with an absolute floor at the array's scale."""
  want = np.asarray(want)
  atol = 1e-5 * max(np.abs(want).max(), 1e-6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=what)


def _t(a, grad=False):
  return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


# name -> (PML class from (num_classes, dim, hparams), its tensor, settings)
CLASSIFIERS = {
    "large_margin_softmax": (lambda c, d, **hp: pml_losses.LargeMarginSoftmaxLoss(c, d, **hp),
                             [{}, dict(margin=3, scale=2.5)]),
    "sphereface": (lambda c, d, **hp: pml_losses.SphereFaceLoss(c, d, **hp),
                   [{}, dict(margin=2, scale=3.0)]),
    # No hyperparameters: the second case is a table of non-unit rows, which
    # PML renormalises in place before it computes.
    "p2s_grad": (lambda c, d: pml_losses.P2SGradLoss(d, c), [{}, {}]),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_class_vector_losses_equal_pml(name):
  make, settings = CLASSIFIERS[name]
  rng = np.random.default_rng(len(name))
  x = _raw(rng)
  labels = rng.permutation(np.arange(12) % 5).astype(np.int32)  # class 5 absent
  for case, hp in enumerate(settings):
    table = rng.normal(size=(6, 8)).astype(np.float32)
    if name == "p2s_grad" and case == 0:
      table /= np.linalg.norm(table, axis=1, keepdims=True)  # as PML holds it
    pml = make(6, 8, **hp).double()
    pml.collect_stats = True  # for avg_angle
    attr = "weight" if name == "p2s_grad" else "W"
    getattr(pml, attr).data = _t(table.T).clone()
    xt = _t(x, grad=True)
    want = pml(xt, torch.tensor(labels, dtype=torch.long))
    want.backward()
    fn = lambda e, p: losses.get(name)(embeddings=e, labels=jnp.asarray(labels),
                                       loss_params={"proxies": p}, **hp)
    (value, aux), (dx, dp) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x), jnp.asarray(table))
    what = f"{name} {hp} case {case}"
    _close(value, want.item(), what, rtol=2e-5)
    _close(dx, xt.grad.numpy(), what)
    _close(dp, getattr(pml, attr).grad.numpy().T, what)
    if name != "p2s_grad":
      np.testing.assert_allclose(aux["avg_angle"], pml.avg_angle, rtol=1e-4)


def test_init_params_draw_as_pml_does():
  """Each table is drawn as PML draws its own tensor, compared with PML's."""
  torch.manual_seed(0)
  c, d = 300, 256
  pml_tables = {
      "large_margin_softmax": pml_losses.LargeMarginSoftmaxLoss(c, d).W.data.T,
      "sphereface": pml_losses.SphereFaceLoss(c, d).W.data.T,
      "p2s_grad": pml_losses.P2SGradLoss(d, c).weight.data.T,
      "manifold": pml_losses.ManifoldLoss(l=d, K=c).proxies.data,
  }
  for name, theirs in pml_tables.items():
    ours = np.asarray(losses.init_params(name, jax.random.key(0), num_classes=c, dim=d,
                                         K=c)["proxies"])
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape == (c, d), name
    # Normal and uniform differ in mean |a| / std (0.80 against 0.87).
    for stat in (np.std, lambda a: np.mean(np.abs(a))):
      assert stat(ours) == pytest.approx(stat(theirs), rel=0.02), name
    unit_rows = np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert unit_rows == (name == "p2s_grad"), name
  with pytest.raises(ValueError, match="integer >= 1"):
    losses.get("sphereface")(embeddings=jnp.ones((2, 8)), labels=jnp.arange(2),
                             loss_params={"proxies": jnp.ones((3, 8))}, margin=0)


def _meta_classes(rng, n, k):
  return rng.permutation(np.concatenate([np.arange(k), rng.integers(0, k, n - k)]))


@pytest.mark.parametrize("hp", [{}, dict(K=5, lambdaC=0.5, alpha=0.6, margin=0.02,
                                         distance="euclidean")], ids=str)
def test_manifold_equals_pml(hp):
  """PML's `indices_tuple` is the assignment to proxies (our `meta_classes`)."""
  k = hp.get("K", 50)
  rng = np.random.default_rng(k)
  x = _raw(rng)
  proxies = rng.normal(size=(k, 8)).astype(np.float32)
  meta = (_meta_classes(rng, 12, k) if k <= 12 else rng.integers(0, k, 12)).astype(np.int32)
  pml_hp = dict(hp, distance=pml_distances.LpDistance()) if "distance" in hp else hp
  pml = pml_losses.ManifoldLoss(l=8, **pml_hp).double()
  pml.proxies.data = _t(proxies).clone()
  xt = _t(x, grad=True)
  want = pml(xt, None, indices_tuple=torch.tensor(meta, dtype=torch.long))
  want.backward()
  fn = lambda e, p: losses.get("manifold")(embeddings=e, loss_params={"proxies": p},
                                           meta_classes=jnp.asarray(meta), **hp)
  (value, aux), (dx, dp) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      jnp.asarray(x), jnp.asarray(proxies))
  # PML inverts the walk's matrix in float32 whatever the dtype.
  _close(value, want.item(), str(hp), rtol=1e-4)
  _close(dx, xt.grad.numpy(), str(hp))
  _close(dp, pml.proxies.grad.numpy(), str(hp))
  assert np.abs(pml.proxies.grad.numpy()).max() > 0
  # The two terms: lambdaC=0 is PML's intrinsic loss alone.
  pml.lambdaC = 0.0
  intrinsic = pml(_t(x), None, indices_tuple=torch.tensor(meta, dtype=torch.long))
  _close(aux["intrinsic"], intrinsic.item(), str(hp), rtol=1e-4)
  assert aux["context"] > 0 and aux["intrinsic"] > 0


def test_manifold_draws_every_proxy_from_its_key():
  k, n = 5, 12
  meta = manifold_lib.draw_meta_classes(jax.random.key(3), n, k)
  assert meta.shape == (n,) and set(np.asarray(meta).tolist()) == set(range(k))
  x = jnp.asarray(_raw(np.random.default_rng(0)))
  params = losses.init_params("manifold", jax.random.key(1), num_classes=0, dim=8, K=k)
  fn = losses.get("manifold")

  @jax.jit
  def by_key_given_and_context_only(x, params, meta):
    by_key, _ = fn(embeddings=x, loss_params=params, rng=jax.random.key(3), K=k)
    given, aux = fn(embeddings=x, loss_params=params, meta_classes=meta, K=k)
    context_only, _ = fn(embeddings=x, loss_params=params, meta_classes=meta, K=k,
                         lambdaC=float("inf"))
    return by_key, given, context_only, aux["context"]
  by_key, given, context_only, context = by_key_given_and_context_only(x, params, meta)
  np.testing.assert_allclose(by_key, given, rtol=1e-6)
  np.testing.assert_allclose(context_only, context, rtol=1e-6)
  for kw, match in [({}, "rng="), (dict(K=4, rng=jax.random.key(0)), r"\[K=4, D\]"),
                    (dict(lambdaC=-1.0, rng=jax.random.key(0)), "lambdaC"),
                    (dict(alpha=1.0, rng=jax.random.key(0)), r"alpha=1.0 must lie in \(0, 1\)")]:
    with pytest.raises(ValueError, match=match):
      fn(embeddings=x, loss_params=params, **dict(dict(K=k), **kw))
  with pytest.raises(ValueError, match="B >= K"):
    fn(embeddings=x[:3], loss_params=params, K=k, rng=jax.random.key(0))


@pytest.mark.parametrize("hp", [{}, dict(invariance_lambda=5.0, variance_mu=10.0,
                                         covariance_v=2.0, eps=1e-3)], ids=str)
def test_vicreg_equals_pml_with_both_views_gradients(hp):
  rng = np.random.default_rng(7)
  # Per-dimension scales below and above 1: the variance hinge is active on some.
  x = _raw(rng) * rng.uniform(0.1, 2.0, size=(1, 8)).astype(np.float32)
  ref = (x + 0.5 * rng.normal(size=x.shape)).astype(np.float32)
  xt, reft = _t(x, grad=True), _t(ref, grad=True)
  want = pml_losses.VICRegLoss(**hp)(xt, ref_emb=reft)
  want.backward()
  fn = lambda a, b: losses.get("vicreg")(embeddings=a, ref_embeddings=b, **hp)
  (value, aux), (da, db) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      jnp.asarray(x), jnp.asarray(ref))
  _close(value, want.item(), str(hp), rtol=2e-5)
  _close(da, xt.grad.numpy(), str(hp))
  _close(db, reft.grad.numpy(), str(hp))
  _close(sum(aux.values()), value, str(hp), rtol=1e-6)
  assert aux["variance"] > 0 and aux["covariance"] > 0
  with pytest.raises(ValueError, match="second view as ref_embeddings"):
    losses.get("vicreg")(embeddings=jnp.asarray(x))
  with pytest.raises(ValueError, match="same"):
    losses.get("vicreg")(embeddings=jnp.asarray(x), ref_embeddings=jnp.asarray(ref[:5]))


class _Cloned(torch.nn.Module):
  """PML's distance with its output copied: PML's label-free mode fills the
  diagonal of cdist's output in place, which cdist's backward needs, so
  PML cannot backward there at all."""

  def __init__(self, distance):
    super().__init__()
    self.distance = distance

  def forward(self, a, b):
    return self.distance(a, b).clone()


# case -> (our hyperparameters, PML's distance where not the default, mode)
DSM_CASES = {
    "defaults": ({}, None, "labels"),
    "settings": (dict(min_val=-4.0, num_bins=12, momentum=0.3, distance="squared_euclidean"),
                 pml_distances.LpDistance(power=2), "labels"),
    "reference_set": (dict(momentum=0.5), None, "reference_set"),
    "label_free": (dict(num_bins=8), None, "label_free"),
}


@pytest.mark.parametrize("case", sorted(DSM_CASES))
def test_dynamic_soft_margin_carries_pmls_histogram(case):
  """Three calls in a row: loss, gradient and PML's `hist_` after each.

  PML keeps the autograd graph on `hist_`, so its second backward() fails
  (PML issue #731); the reference detaches the buffer between calls, which
  is what our state (returned under stop_gradient) amounts to. Label-free,
  it also copies the distance matrix it writes into (`_Cloned`)."""
  hp, pml_distance, mode = DSM_CASES[case]
  rng = np.random.default_rng(len(case))
  pml_hp = {k: v for k, v in hp.items() if k != "distance"}
  if pml_distance is not None:
    pml_hp["distance"] = pml_distance
  pml = pml_losses.DynamicSoftMarginLoss(**pml_hp).double()
  if mode == "label_free":
    pml.distance = _Cloned(pml.distance)
  def loss_aux_state(e, r, state, y, ry):
    loss, aux, new_state = losses.get("dynamic_soft_margin")(
        embeddings=e, labels=y, ref_embeddings=r, ref_labels=ry, loss_state=state, **hp)
    return loss, (aux, new_state)
  fn = jax.jit(jax.value_and_grad(loss_aux_state, argnums=(0, 1), has_aux=True))
  state = losses.init_state("dynamic_soft_margin", **hp)
  assert state["hist"].shape == (hp.get("num_bins", 10),) and not np.any(state["hist"])
  for call in range(3):
    x = _raw(rng)
    labels = rng.permutation(np.arange(12) % 4).astype(np.int32)
    ref = ref_labels = None
    kwargs = {}
    if mode == "reference_set":
      ref, ref_labels = _raw(rng, n=9), rng.integers(0, 4, 9).astype(np.int32)
      kwargs = dict(ref_emb=_t(ref, grad=True),
                    ref_labels=torch.tensor(ref_labels, dtype=torch.long))
    elif mode == "label_free":
      ref, labels = x + 0.3 * rng.normal(size=x.shape).astype(np.float32), None
      kwargs = dict(ref_emb=_t(ref, grad=True))
    xt = _t(x, grad=True)
    pml.hist_ = pml.hist_.detach()
    want = pml(xt, None if labels is None else torch.tensor(labels, dtype=torch.long),
               **kwargs)
    want.backward()
    (value, (aux, state)), (dx, dref) = fn(x, ref, state, labels, ref_labels)
    what = f"{case} call {call}"
    _close(value, want.item(), what, rtol=1e-4)
    _close(state["hist"], pml.hist_.detach().numpy(), what, rtol=1e-4)
    _close(dx, xt.grad.numpy(), what)
    if ref is not None:
      _close(dref, kwargs["ref_emb"].grad.numpy(), what)
    assert aux["triplets"] > 0 and abs(want.item()) > 0


def test_dynamic_soft_margin_state_contract_and_bad_input():
  fn = losses.get("dynamic_soft_margin")
  x = jnp.asarray(_raw(np.random.default_rng(1), n=4))
  state = losses.init_state("dynamic_soft_margin")
  # No triplets (one class): 0, and the state stays as it was.
  value, aux, new = jax.jit(lambda e, y: fn(embeddings=e, labels=y, loss_state=state))(
      x, jnp.zeros(4, jnp.int32))
  assert value == 0 and aux["triplets"] == 0 and not np.any(new["hist"])
  # Margins outside [min_val, -min_val - delta) land in the end bins (PML
  # indexes out of bounds there and fails).
  narrow = dict(min_val=-0.1, num_bins=4)
  value, _, new = jax.jit(lambda e, y, s: fn(embeddings=e, labels=y, loss_state=s, **narrow))(
      x, jnp.arange(4) % 2,
      losses.init_state("dynamic_soft_margin", **narrow))
  assert np.isfinite(value) and new["hist"][0] > 0 and new["hist"][-1] > 0
  np.testing.assert_allclose(np.sum(new["hist"]), 1.0, rtol=1e-6)
  for kw, match in [(dict(distance="cosine"), "LpDistance with p=2"),
                    (dict(num_bins=5), r"init_state\(num_bins=5\)"),
                    (dict(labels=None), "matching view")]:
    with pytest.raises(ValueError, match=match):
      fn(**dict(dict(embeddings=x, labels=jnp.arange(4) % 2, loss_state=state), **kw))


def test_what_the_unlabelled_and_stateful_losses_consume():
  assert losses.consumes("manifold") == {"params", "rng"}
  assert losses.consumes("vicreg") == frozenset()
  assert losses.consumes("dynamic_soft_margin") == {"reference_set", "state"}
  state = losses.init_state("dynamic_soft_margin", num_bins=7)
  assert losses.inputs_for("dynamic_soft_margin", {"state": state}) == {"loss_state": state}
  with pytest.raises(ValueError, match="consumes 'state'"):
    losses.inputs_for("dynamic_soft_margin", {})
