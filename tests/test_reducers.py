"""`reduction=` against PML 2.9.0's reducers on the same raw arrays.

Each loss is built in PML with the reducer of the same meaning and run in
float64; value and gradient (w.r.t. the embeddings and class vectors) must
agree, and "do_nothing" must list PML's per-element losses. The losses
cover every reduction type: triplet (triplet), contrastive (pos_pair and
neg_pair), ntxent (pos_pair), supcon and circle (element over anchors),
arcface (element, with class vectors) and proxy_anchor (element over
proxies, with divisors).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from jaxdml import losses
from jaxdml.losses import distances
from jaxdml.losses import reducers

CLASSES = 6  # class vectors; the batch holds classes 0-3
# name -> (PML class, the attribute holding its class vectors (None: none), a non-default
# setting as (ours, PML's)).
LOSSES = {
    "triplet": (pml_losses.TripletMarginLoss, None,
                (dict(margin=0.3, distance="cosine"),
                 dict(margin=0.3, distance=pml_distances.CosineSimilarity()))),
    "contrastive": (pml_losses.ContrastiveLoss, None,
                    (dict(pos_margin=0.2, neg_margin=0.9),) * 2),
    "ntxent": (pml_losses.NTXentLoss, None, (dict(temperature=0.5),) * 2),
    "supcon": (pml_losses.SupConLoss, None, (dict(temperature=0.3),) * 2),
    "circle": (pml_losses.CircleLoss, None, (dict(m=0.25, gamma=32.0),) * 2),
    "arcface": (lambda **hp: pml_losses.ArcFaceLoss(CLASSES, 8, **hp), "W",
                (dict(margin=10.0, scale=16.0),) * 2),
    "proxy_anchor": (lambda **hp: pml_losses.ProxyAnchorLoss(CLASSES, 8, **hp), "proxies",
                     (dict(margin=0.2, alpha=16.0),) * 2),
}
SUB_LOSSES = {"contrastive": ("pos_loss", "neg_loss"), "proxy_anchor": ("pos_loss", "neg_loss")}
WEIGHTS = np.linspace(0.5, 2.0, CLASSES)


def _batch(seed, n=16, dim=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)) * rng.uniform(0.3, 4.0, size=(n, 1))
  labels = rng.permutation(np.arange(n) % 4)
  proxies = rng.normal(size=(CLASSES, dim))
  return x.astype(np.float32), labels.astype(np.int32), proxies.astype(np.float32)


def pml_reducer(spec):
  """PML's reducer for one of our `reduction=` values."""
  spec = reducers.parse(spec)
  name = spec["name"]
  simple = {"avg_nonzero": pml_reducers.AvgNonZeroReducer, "mean": pml_reducers.MeanReducer,
            "sum": pml_reducers.SumReducer, "divisor": pml_reducers.DivisorReducer,
            "do_nothing": pml_reducers.DoNothingReducer}
  if name in simple:
    return simple[name]()
  if name == "threshold":
    return pml_reducers.ThresholdReducer(low=spec.get("low"), high=spec.get("high"))
  if name == "class_weighted":
    return pml_reducers.ClassWeightedReducer(torch.tensor(spec["weights"]))
  if name == "per_anchor":
    return pml_reducers.PerAnchorReducer(reducer=pml_reducer(spec["reducer"]))
  return pml_reducers.MultipleReducers({k: pml_reducer(v) for k, v in spec["reducers"].items()},
                                       default_reducer=pml_reducer(spec["default"]))


def run_pml(name, pml_hp, reducer, x, labels, proxies, squeeze=False):
  """PML's value (or DoNothing dict) and gradients, float64. `squeeze`: the
  reducer gets the per-element losses as [N], not PML's CircleLoss's [N, 1]."""
  make, attr, _ = LOSSES[name]
  loss_fn = make(reducer=pml_reducers.DoNothingReducer() if squeeze else reducer,
                 **pml_hp).double()
  if attr:
    table = proxies.T if attr == "W" else proxies
    getattr(loss_fn, attr).data = torch.tensor(table, dtype=torch.float64)
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  out = loss_fn(xt, torch.tensor(labels, dtype=torch.long))
  if squeeze:
    info = dict(out["loss"], losses=out["loss"]["losses"][:, 0])
    out = reducer({"loss": info}, xt, torch.tensor(labels, dtype=torch.long))
  if isinstance(out, dict):
    return out, None, None
  out.backward()
  dp = None
  if attr:
    dp = getattr(loss_fn, attr).grad.numpy()
    dp = dp.T if attr == "W" else dp
  return out.item(), xt.grad.numpy(), dp


def run_ours(name, hp, x, labels, proxies, **kwargs):
  """Our (value, aux) and gradients w.r.t. the embeddings and class vectors."""
  def fn(e, p):
    extra = {"loss_params": {"proxies": p}} if LOSSES[name][1] else {}
    return losses.get(name)(embeddings=e, labels=jnp.asarray(labels), **extra, **hp, **kwargs)
  if reducers.parse(kwargs.get("reduction", "mean"))["name"] == "do_nothing":
    return fn(jnp.asarray(x), jnp.asarray(proxies)), None, None
  (value, aux), (dx, dp) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.asarray(x), jnp.asarray(proxies))
  return (value, aux), dx, dp


def compare(name, got, want):
  (value, _), dx, dp = got
  want_value, want_dx, want_dp = want
  np.testing.assert_allclose(value, want_value, rtol=2e-5, atol=1e-6, err_msg=name)
  scale = np.abs(want_dx).max() + 1e-12
  np.testing.assert_allclose(dx, want_dx, rtol=1e-3, atol=2e-4 * scale, err_msg=name)
  if want_dp is not None:
    np.testing.assert_allclose(dp, want_dp, rtol=1e-3, atol=2e-4 * np.abs(want_dp).max(),
                               err_msg=name)


def _listed(ours, indices, kind):
  """Our dense per-element losses at PML's indices."""
  if kind == "element":
    return np.asarray(ours)[indices.numpy()]
  return np.asarray(ours)[tuple(i.numpy() for i in indices)]


def _thresholds(name, hp, pml_hp, x, labels, proxies):
  """Bounds between the 1st/3rd quartiles of PML's own per-element losses, so
  both bounds cut and no loss sits on one."""
  listed, _, _ = run_pml(name, pml_hp, pml_reducers.DoNothingReducer(), x, labels, proxies)
  values = np.unique(np.concatenate([np.atleast_1d(v["losses"].detach().numpy())
                                     for v in listed.values()]))
  def cut(q):
    i = int(q * (len(values) - 1))
    return float(values[i] + values[i + 1]) / 2
  return {"name": "threshold", "low": cut(0.25), "high": cut(0.75)}


def _specs(name):
  subs = SUB_LOSSES.get(name, ("loss",))
  specs = ["avg_nonzero", "mean", "sum", {"name": "class_weighted", "weights": WEIGHTS},
           "threshold", {"name": "multiple", "reducers": {subs[0]: "sum"},
                         "default": "avg_nonzero"}]
  if name != "triplet":  # PML defines no per-anchor reduction of triplets
    specs += ["per_anchor", {"name": "per_anchor", "reducer": "sum"}]
  if name == "proxy_anchor":
    specs.append("divisor")
  return specs


CASES = [(name, spec, setting) for name in LOSSES for spec in _specs(name)
         for setting in ("default", "set")]


@pytest.mark.parametrize("name,spec,setting", CASES,
                         ids=[f"{n}-{s if isinstance(s, str) else s['name']}-{h}"
                              for n, s, h in CASES])
def test_reduction_equals_pmls_reducer(name, spec, setting):
  x, labels, proxies = _batch(len(name) + len(str(spec)))
  hp, pml_hp = ({}, {}) if setting == "default" else LOSSES[name][2]
  if spec == "threshold":
    spec = _thresholds(name, hp, pml_hp, x, labels, proxies)
  elif spec == "per_anchor":
    spec = {"name": "per_anchor"}
  # PML's CircleLoss lists [B, 1] losses, which its ClassWeightedReducer broadcasts
  # against the [B] weights (the mean loss times the mean weight); ours weighs
  # each anchor's loss by its class, ClassWeightedReducer's meaning.
  squeeze = name == "circle" and reducers.parse(spec)["name"] == "class_weighted"
  want = run_pml(name, pml_hp, pml_reducer(spec), x, labels, proxies, squeeze=squeeze)
  assert want[0] != 0, "the case must exercise the reducer"
  compare(name, run_ours(name, hp, x, labels, proxies, reduction=spec), want)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_do_nothing_lists_pmls_per_element_losses(name):
  x, labels, proxies = _batch(len(name))
  want, _, _ = run_pml(name, {}, pml_reducers.DoNothingReducer(), x, labels, proxies)
  (got, aux), _, _ = run_ours(name, {}, x, labels, proxies, reduction="do_nothing")
  assert set(got) == set(want)
  for sub, info in want.items():
    assert got[sub]["reduction_type"] == info["reduction_type"]
    listed = _listed(got[sub]["losses"], info["indices"], info["reduction_type"])
    want_losses = info["losses"].detach().numpy().reshape(-1)  # CircleLoss's are [B, 1]
    np.testing.assert_allclose(listed, want_losses, rtol=2e-5, atol=1e-6)
    assert int(np.sum(got[sub]["mask"])) == len(info["losses"]), sub


def test_the_default_reduction_is_pmls_default_reducer():
  x, labels, proxies = _batch(3)
  for name in LOSSES:
    default = run_ours(name, {}, x, labels, proxies)[0][0]
    want = run_pml(name, {}, None, x, labels, proxies)[0]
    np.testing.assert_allclose(default, want, rtol=2e-5, err_msg=name)


def test_a_reduction_pml_does_not_define_is_one_clear_error():
  x, labels, proxies = _batch(0)
  with pytest.raises(ValueError, match="not defined for triplet"):
    run_ours("triplet", {}, x, labels, proxies, reduction="per_anchor")
  with pytest.raises(ValueError, match="gives a divisor"):
    run_ours("contrastive", {}, x, labels, proxies, reduction="divisor")
  with pytest.raises(ValueError, match="unknown reducer 'median'"):
    run_ours("supcon", {}, x, labels, proxies, reduction="median")
  with pytest.raises(ValueError, match="needs 'low' or 'high'"):
    run_ours("circle", {}, x, labels, proxies, reduction={"name": "threshold"})
  with pytest.raises(ValueError, match="takes no \\['hgih'\\]"):
    run_ours("circle", {}, x, labels, proxies, reduction={"name": "threshold", "hgih": 1.0})


def test_reduction_keeps_the_loss_jittable():
  x, labels, _ = _batch(1)
  spec = {"name": "threshold", "low": 0.01, "high": 0.5}
  fn = jax.jit(losses.make("contrastive", with_aux=False, reduction=spec))
  np.testing.assert_allclose(fn(jnp.asarray(x), labels=jnp.asarray(labels)),
                             losses.get("contrastive")(embeddings=x, labels=labels,
                                                       reduction=spec)[0], rtol=1e-6)


@pytest.mark.parametrize("spec", ["euclidean", "cosine", {"name": "lp", "p": 1, "power": 2},
                                  "snr", {"name": "dot", "normalize_embeddings": False}])
def test_a_chunked_distance_equals_the_whole_matrix(spec):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(37, 8)).astype(np.float32)
  whole = lambda x, y: jnp.sum(jnp.sin(distances.pairwise(x, y, distance=spec)))
  chunked = lambda x, y: jnp.sum(jnp.sin(distances.batched(x, y, distance=spec, chunk_size=8)))
  np.testing.assert_allclose(distances.pairwise(x, y, distance=spec, chunk_size=8),
                             distances.pairwise(x, y, distance=spec), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(chunked, argnums=(0, 1))(x, y),
                       jax.grad(whole, argnums=(0, 1))(x, y)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="chunk_size=0"):
    distances.batched(x, y, distance=spec, chunk_size=0)


ALREADY_REDUCED = ("histogram", "pnp", "threshold_consistent_margin")


@pytest.mark.parametrize("name", sorted(__import__("test_pml_defaults").LOSSES))
def test_every_distance_loss_sums_as_pmls_sum_reducer(name):
  import test_pml_defaults  # pylint: disable=g-import-not-at-top
  x, labels = test_pml_defaults._raw_batch(len(name))  # pylint: disable=protected-access
  fn = lambda e: losses.get(name)(embeddings=e, labels=jnp.asarray(labels), reduction="sum")[0]
  if name in ALREADY_REDUCED:  # PML's loss is one number: its reducers leave it as it is
    with pytest.raises(ValueError, match="already reduced"):
      fn(jnp.asarray(x))
    return
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  want = test_pml_defaults.LOSSES[name](reducer=pml_reducers.SumReducer())(
      xt, torch.tensor(labels, dtype=torch.long))
  want.backward()
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
  test_pml_defaults._compare(value, grad, want.item(), xt.grad.numpy())  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["proxy_nca", "normalized_softmax", "cosface",
                                  "subcenter_arcface", "soft_triple"])
def test_every_proxy_loss_sums_as_pmls_sum_reducer(name):
  import test_pml_losses  # pylint: disable=g-import-not-at-top
  _, per_class = test_pml_losses.PER_CLASS.get(name, (None, 1))
  x, labels, proxies = test_pml_losses._inputs("random", np.random.default_rng(len(name)),  # pylint: disable=protected-access
                                               classes=6 * per_class)
  want, want_dx, want_dp = test_pml_losses._pml(  # pylint: disable=protected-access
      name, {"reducer": pml_reducers.SumReducer()}, x, labels, proxies)
  fn = lambda e, p: losses.get(name)(embeddings=e, labels=jnp.asarray(labels),
                                     loss_params={"proxies": p}, reduction="sum")
  (value, aux), (dx, dp) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      jnp.asarray(x), jnp.asarray(proxies))
  compare(name, ((value, aux), dx, dp), (want, want_dx, want_dp))


def test_every_pml_loss_takes_a_reduction_and_the_others_say_so():
  import inspect  # pylint: disable=g-import-not-at-top
  ours = {"koleo", "embedding_distill", "obd_sd"}  # not PML's (raml has its own reduction=)
  for name in losses.names():
    takes = "reduction" in inspect.signature(losses.get(name)).parameters
    assert takes == (name not in ours), name
  x, labels, _ = _batch(2)
  with pytest.raises(ValueError, match="p2s_grad: reduction='sum' is not available .*already"):
    losses.get("p2s_grad")(embeddings=x, labels=labels, loss_params={"proxies": x[:4]},
                           reduction="sum")


@pytest.mark.parametrize("spec", ["sum", {"name": "class_weighted", "weights": WEIGHTS}])
@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
@pytest.mark.parametrize("miner", ["batch_hard", "pair_margin", "triplet_margin"])
def test_a_reduction_after_a_miner_equals_pmls(miner, loss, spec):
  """Mined tuples reduce as PML's index lists do, repeats included."""
  import test_pml_defaults  # pylint: disable=g-import-not-at-top
  from jaxdml.losses import miners  # pylint: disable=g-import-not-at-top
  x, labels = test_pml_defaults._raw_batch(3 + len(miner))  # pylint: disable=protected-access
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  yt = torch.tensor(labels, dtype=torch.long)
  pml_loss = test_pml_defaults.LOSSES[loss](reducer=pml_reducer(spec))
  want = pml_loss(xt, yt, test_pml_defaults.MINERS[miner]()(xt.detach(), yt))
  want.backward()
  assert want.item() > 0, "the case must exercise the loss"
  fn = lambda e: losses.get(loss)(
      embeddings=e, labels=jnp.asarray(labels), reduction=spec,
      mined=miners.get(miner)(embeddings=e, labels=jnp.asarray(labels)))[0]
  value, grad = jax.value_and_grad(fn)(jnp.asarray(x))
  test_pml_defaults._compare(value, grad, want.item(), xt.grad.numpy())  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["large_margin_softmax", "sphereface"])
def test_the_large_margin_classifiers_reduce_as_pml(name):
  pml_class = {"large_margin_softmax": pml_losses.LargeMarginSoftmaxLoss,
               "sphereface": pml_losses.SphereFaceLoss}[name]
  x, labels, proxies = _batch(len(name))
  pml_loss = pml_class(CLASSES, 8, reducer=pml_reducers.DoNothingReducer()).double()
  pml_loss.W.data = torch.tensor(proxies.T, dtype=torch.float64)
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  yt = torch.tensor(labels, dtype=torch.long)
  # Half of PML's per-sample losses (16, an even count) lie above the median.
  spec = {"name": "threshold", "low": float(np.median(
      pml_loss(xt, yt)["loss"]["losses"].detach().numpy()))}
  pml_loss.reducer = pml_reducer(spec)
  want = pml_loss(xt, yt)
  want.backward()
  fn = lambda e, p: losses.get(name)(embeddings=e, labels=jnp.asarray(labels),
                                     loss_params={"proxies": p}, reduction=spec)[0]
  value, (dx, dp) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(proxies))
  compare(name, ((value, {}), dx, dp), (want.item(), xt.grad.numpy(), pml_loss.W.grad.numpy().T))


@pytest.mark.parametrize("spec", ["sum", {"name": "multiple", "reducers": {
    "invariance_loss": "sum", "variance_loss2": {"name": "threshold", "high": 0.3}}}])
def test_vicreg_reduces_its_four_sub_losses_as_pml(spec):
  x, _, _ = _batch(9)
  ref = x[::-1] * 0.5 + 0.1
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  want = pml_losses.VICRegLoss(reducer=pml_reducer(spec))(
      xt, ref_emb=torch.tensor(ref, dtype=torch.float64))
  want.backward()
  fn = lambda e: losses.get("vicreg")(embeddings=e, ref_embeddings=jnp.asarray(ref),
                                      reduction=spec)
  (value, aux), dx = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(x))
  compare("vicreg", ((value, aux), dx, None), (want.item(), xt.grad.numpy(), None))
