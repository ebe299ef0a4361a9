"""Tests for jaxdml.losses: PML 2.9.0 cross-checks, hand-computed cases,
invariances, sharding, masking and NaN safety.

Compilation dominates the runtime on CPU, so each test evaluates all of its
configurations inside one jitted function (vmapped over cases where the
shapes agree) instead of compiling per configuration.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from jaxdml import losses
from jaxdml.losses import distances
from jaxdml.losses import miners


def _close(a, b, tol=1e-5, msg=""):
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=msg)


def _run_jit(f, *args):
  """jax.jit(f)(*args) with XLA's CPU backend optimisations off. Each test
  compiles one big function and runs it once, so compile time is the whole
  cost and -O0 halves it; the partitioner and semantics are unchanged."""
  lowered = jax.jit(f).lower(*args)
  return lowered.compile({"xla_backend_optimization_level": 0})(*args)


def _values(calls):
  """[(name, arrays, hparams)] -> loss values, all in one jit."""
  arrays = [{k: jnp.asarray(v) for k, v in a.items()} for _, a, _ in calls]

  def f(arrays):
    return [losses.get(n)(**a, **hp)[0] for (n, _, hp), a in zip(calls,
                                                                 arrays)]

  return [float(v) for v in _run_jit(f, arrays)]


# ----------------------------------------------------------- PML helpers
def _pml_distance(distance):
  """PML's distance object for one of ours (a name, dict or Distance)."""
  d = distances.resolve(distance)
  if d.kind == "dot":
    return (pml_dist.CosineSimilarity() if d.normalize_embeddings
            else pml_dist.DotProductSimilarity(normalize_embeddings=False))
  return pml_dist.LpDistance(p=d.p, power=d.power, normalize_embeddings=d.normalize_embeddings)


# The rows as they are: what BatchNorm-ended embeddings use.
RAW = {name: dict(name=name, normalize_embeddings=False)
       for name in ("euclidean", "squared_euclidean")}


def _pml_loss_and_miner(name, hp):
  default = "cosine" if name == "multi_similarity" else "euclidean"
  kw = dict(distance=_pml_distance(hp.get("distance", default)))
  if hp.get("reduction") == "mean":
    kw["reducer"] = pml_reducers.MeanReducer()
  if name == "triplet":
    loss = pml_losses.TripletMarginLoss(margin=hp["margin"], **kw)
    miner = {
        "all": None,
        "hard": pml_miners.BatchHardMiner(distance=kw["distance"]),
        "semihard": pml_miners.TripletMarginMiner(
            margin=hp["margin"], type_of_triplets="semihard",
            distance=kw["distance"]),
    }[hp["mining"]]
    return loss, miner
  if name == "contrastive":
    return pml_losses.ContrastiveLoss(
        pos_margin=hp["pos_margin"], neg_margin=hp["neg_margin"], **kw), None
  loss = pml_losses.MultiSimilarityLoss(
      alpha=hp["alpha"], beta=hp["beta"], base=hp["base"], **kw)
  eps = hp.get("miner_epsilon")
  miner = None if eps is None else pml_miners.MultiSimilarityMiner(
      epsilon=eps, distance=kw["distance"])
  return loss, miner


def _pml(name, hp, emb, labels, ref=None, ref_labels=None):
  """PML loss and its gradients w.r.t. (embeddings, ref) in float64."""
  loss_fn, miner = _pml_loss_and_miner(name, hp)
  e = torch.tensor(emb, dtype=torch.float64, requires_grad=True)
  y = torch.tensor(labels)
  r = ry = None
  if ref is not None:
    r = torch.tensor(ref, dtype=torch.float64, requires_grad=True)
    ry = torch.tensor(ref_labels)
  idx = None if miner is None else miner(e, y, r, ry)
  val = loss_fn(e, y, idx, r, ry)
  inputs = [e] if r is None else [e, r]
  grads = torch.autograd.grad(val, inputs, allow_unused=True)
  grads = [np.zeros(t.shape) if g is None else g.numpy()
           for g, t in zip(grads, inputs)]
  return val.item(), grads


def _ours_many(configs, emb, labels, ref=None, ref_labels=None, grad=True):
  """Our values (and grads) for every config, vmapped over stacked cases."""

  def one_case(e, y, r, ry):
    out = []
    for name, hp in configs:
      fn = losses.get(name)
      kw = {} if r is None else dict(ref_labels=ry)

      def f(e, r, fn=fn, hp=hp, kw=kw):
        if r is not None:
          kw = dict(kw, ref_embeddings=r)
        return fn(embeddings=e, labels=y, **kw, **hp)[0]

      if grad:
        out.append(jax.value_and_grad(f, argnums=(0, 1))(e, r))
      else:
        out.append(f(e, r))
    return out

  args = [jnp.asarray(x) if x is not None else None
          for x in (emb, labels, ref, ref_labels)]
  return jax.device_get(_run_jit(jax.vmap(one_case), *args))


def _batch(seed, b=8, d=5, classes=4):
  rng = np.random.RandomState(seed)
  return rng.randn(b, d), rng.randint(0, classes, size=b)


def _ties_batch():
  """Integer coordinates in {-1, 0, 1}: many exactly equal distances (ties in
  mining, dis_an == dis_ap at the semi-hard boundary) and a duplicated row
  (distance 0 to a positive: the safe sqrt)."""
  emb = np.random.RandomState(7).randint(-1, 2, size=(8, 5)).astype(float)
  emb[4] = emb[0]
  return emb, np.array([0, 1, 2, 3, 0, 1, 1, 2])


# All cases share shapes (B=8, D=5; reference set R=9) so they stack.
CASES = {
    "random": _batch(0),
    "random2": _batch(1, classes=3),
    "single_pos_pair": (np.random.RandomState(2).randn(8, 5),
                        np.array([0, 0, 1, 2, 3, 4, 5, 6])),
    "no_negatives": (np.random.RandomState(3).randn(8, 5), np.zeros(8, int)),
    "ties": _ties_batch(),
}


def _ref_cases():
  rng = np.random.RandomState(11)
  out = {}
  for case in CASES:
    ref, ref_labels = rng.randn(9, 5), rng.randint(0, 4, size=9)
    if case == "no_negatives":
      ref_labels[:] = 0
    if case == "single_pos_pair":  # only anchor 2 (label 1) has a positive
      ref_labels = np.array([1, 7, 8, 9, 10, 11, 12, 13, 14])
    if case == "ties":
      ref[:4] = CASES["ties"][0][:4]
    out[case] = (ref, ref_labels)
  return out


PML_CONFIGS = [
    ("triplet", dict(margin=0.2, mining="all", distance=RAW["euclidean"])),
    ("triplet", dict(margin=0.3, mining="hard", distance=RAW["euclidean"])),
    ("triplet", dict(margin=5.0, mining="semihard",
                     distance=RAW["squared_euclidean"])),
    ("triplet", dict(margin=0.1, mining="all", distance="cosine")),
    ("triplet", dict(margin=0.2, mining="hard", distance="cosine")),
    ("triplet", dict(margin=0.4, mining="semihard", distance="cosine")),
    ("triplet", dict(margin=0.5, mining="all", distance=RAW["euclidean"],
                     reduction="mean")),
    ("contrastive", dict(pos_margin=0.93, neg_margin=0.23,
                         distance="cosine")),
    ("contrastive", dict(pos_margin=0.5, neg_margin=3.0,
                         distance=RAW["euclidean"])),
    ("contrastive", dict(pos_margin=0.3, neg_margin=4.0,
                         distance=RAW["euclidean"], reduction="mean")),
    ("multi_similarity", dict(alpha=2.0, beta=40.0, base=0.5)),
    ("multi_similarity", dict(alpha=2.0, beta=40.0, base=0.5,
                              miner_epsilon=0.1)),
]


@functools.lru_cache(maxsize=None)
def _pml_comparison(with_ref):
  """{config index: (ours values, ours grads, PML values, PML grads)}."""
  names = list(CASES)
  emb = np.stack([CASES[c][0] for c in names])
  labels = np.stack([CASES[c][1] for c in names])
  ref = ref_labels = None
  if with_ref:
    refs = _ref_cases()
    ref = np.stack([refs[c][0] for c in names])
    ref_labels = np.stack([refs[c][1] for c in names])
  with jax.enable_x64(True):
    ours = _ours_many(PML_CONFIGS, emb, labels, ref, ref_labels)
  out = {}
  for k, (name, hp) in enumerate(PML_CONFIGS):
    want = [_pml(name, hp, emb[i], labels[i],
                 None if ref is None else ref[i],
                 None if ref is None else ref_labels[i])
            for i in range(len(names))]
    val, grads = ours[k]
    out[k] = (val, grads, [w[0] for w in want], [w[1] for w in want])
  return names, out


@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("k", range(len(PML_CONFIGS)),
                         ids=[f"{n}-" + "-".join(
                             str(distances.resolve(v)) if k == "distance" else str(v)
                             for k, v in hp.items()) for n, hp in PML_CONFIGS])
def test_matches_pml(k, with_ref):
  """Values and d loss / d embeddings (and / d ref) equal PML's, float64."""
  names, out = _pml_comparison(with_ref)
  val, grads, want_val, want_grads = out[k]
  name, hp = PML_CONFIGS[k]
  for i, case in enumerate(names):
    if case == "ties" and hp.get("distance") == "cosine" and (
        hp.get("mining") == "semihard"):
      # Integer rows give cosine ties s_an == s_ap exactly in real numbers,
      # which rounding (different in torch and XLA) puts on either side of
      # the semi-hard boundary; the euclidean configs test exact ties.
      continue
    _close(val[i], want_val[i], msg=case)
    _close(grads[0][i], want_grads[i][0], msg=case)
    if with_ref:
      _close(grads[1][i], want_grads[i][1], msg=case)
  # the comparison is not vacuous: most cases have a non-zero loss
  assert np.count_nonzero(val) >= 3


def test_pml_degenerate_pair_rule():
  """PML's pair losses return 0 with <= 1 positive and <= 1 negative pair."""
  configs = PML_CONFIGS[7:]
  emb, ref = np.random.RandomState(0).randn(1, 1, 4), np.ones((1, 2, 4))
  with jax.enable_x64(True):
    ours = _ours_many(configs, emb, np.zeros((1, 1), int), ref,
                      np.array([[0, 1]]), grad=False)
  for (name, hp), got in zip(configs, ours):
    assert _pml(name, hp, emb[0], [0], ref[0], [0, 1])[0] == 0.0
    assert float(got[0]) == 0.0


def test_float32_close_to_pml():
  emb, labels = _batch(5, b=32, d=16, classes=6)
  configs = [PML_CONFIGS[i] for i in (0, 4, 5, 7, 11)]
  ours = _ours_many(configs, emb[None].astype(np.float32), labels[None],
                    grad=False)
  for (name, hp), got in zip(configs, ours):
    want = _pml(name, hp, emb, labels)[0]
    assert want > 0
    np.testing.assert_allclose(got[0], want, rtol=2e-4, atol=1e-6,
                               err_msg=name)


# ------------------------------------------------ reference-set conventions
# relative_triplet and contrastive_koleo share these code paths (masks,
# triplet core, contrastive) and are left out to keep the compile short.
RANKING_CONFIGS = [
    ("triplet", dict(mining="semihard", margin=0.5)),
    ("contrastive", dict(pos_margin=0.2, neg_margin=2.0)),
    ("multi_similarity", dict(miner_epsilon=0.1)),
]


def test_ref_valid_and_self_index():
  """Garbage in masked slots changes nothing; the batch inside the reference
  set with ref_self_index reproduces the in-batch value and gradient."""
  emb, labels = _batch(3, b=10, d=6, classes=3)
  rng = np.random.RandomState(1)
  mem, mem_y = rng.randn(7, 6), rng.randint(0, 3, 7)
  valid = np.array([1, 0, 1, 1, 0, 1, 0], bool)
  garbage = np.where(valid[:, None], mem, 1e3 * rng.randn(7, 6))
  garbage_y = np.where(valid, mem_y, labels[0])

  def all_variants(e, y):
    out = []
    for name, hp in RANKING_CONFIGS:
      fn = functools.partial(losses.get(name), labels=y, **hp)
      variants = [
          lambda e: fn(embeddings=e, ref_embeddings=mem[valid],
                       ref_labels=mem_y[valid]),
          lambda e: fn(embeddings=e, ref_embeddings=garbage,
                       ref_labels=garbage_y, ref_valid=valid),
          lambda e: fn(embeddings=e),
          lambda e: fn(embeddings=e,
                       ref_embeddings=jnp.concatenate([garbage, e]),
                       ref_labels=jnp.concatenate([garbage_y, y]),
                       ref_valid=np.r_[np.zeros(7, bool), np.ones(10, bool)],
                       ref_self_index=jnp.arange(10) + 7),
      ]
      out.append([jax.value_and_grad(lambda e, v=v: v(e)[0])(e)
                  for v in variants])
    return out

  results = _run_jit(all_variants, jnp.asarray(emb, jnp.float32),
                     jnp.asarray(labels))
  for (name, _), (masked_ref, garbage_ref, batch, batch_in_ref) in zip(
      RANKING_CONFIGS, results):
    for a, b in ((masked_ref, garbage_ref), (batch, batch_in_ref)):
      _close(a[0], b[0], msg=name)
      _close(a[1], b[1], msg=name)
    assert float(masked_ref[0]) > 0 and float(batch[0]) > 0, name


# ------------------------------------------------- hand-computed references
def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def _rtl_numpy(a, y, p, yp, margin, in_batch):
  """Brute-force weighted batch-all triplets, euclidean distance."""
  dist = np.linalg.norm(a[:, None] - p[None], axis=-1)
  num = den = 0.0
  for i in range(len(a)):
    for j in range(len(p)):
      if yp[j] != y[i] or (in_batch and j == i):
        continue
      for n in range(len(p)):
        h = dist[i, j] - dist[i, n] + margin
        if yp[n] == y[i] or h <= 0:
          continue
        members = a[y == yp[n]]
        w = 1.0
        if len(members):
          c = members.mean(0)
          w = 1.0 - max(0.0, a[i] @ c / np.linalg.norm(a[i]) /
                        np.linalg.norm(c))
        num, den = num + w * h, den + w
  return num / den if den > 0 else 0.0


def test_relative_triplet_hand_computed():
  rng = np.random.RandomState(0)
  sketches = rng.randn(8, 6)
  sketches[3] = sketches[2] + 0.01 * rng.randn(6)  # near-identical sketches
  y = np.array([0, 1, 2, 3, 4, 5, 0, 1])  # photos 0, 1 have two sketches
  photos, yp = rng.randn(9, 6), np.arange(9)  # photos 6-8 have no sketch
  got = _values([
      ("relative_triplet", dict(embeddings=sketches, labels=y,
                                ref_embeddings=photos, ref_labels=yp),
       dict(margin=1.0, distance=RAW["euclidean"])),
      ("relative_triplet", dict(embeddings=sketches, labels=y),
       dict(margin=1.0, distance=RAW["euclidean"])),
  ])
  _close(got[0], _rtl_numpy(sketches, y, photos, yp, 1.0, False))
  _close(got[1], _rtl_numpy(sketches, y, sketches, y, 1.0, True))
  # A sketch (near-)identical to the negative photo's sketch costs nothing;
  # photos without sketches in the batch weigh 1.
  w = losses.relative_triplet.anchor_dissimilarity_weights(
      jnp.asarray(sketches), jnp.asarray(y), jnp.asarray(yp))
  assert w[2, 3] < 1e-3 and w[3, 2] < 1e-3
  np.testing.assert_allclose(w[:, 6:], 1.0)


def test_relative_triplet_none_is_triplet():
  emb, labels = _batch(9, b=10, d=6, classes=3)
  ref, ref_y = _batch(10, b=12, d=6, classes=4)
  calls = []
  for mining in ("all", "hard", "semihard"):
    for arrays in (dict(embeddings=emb, labels=labels),
                   dict(embeddings=emb, labels=labels, ref_embeddings=ref,
                        ref_labels=ref_y)):
      hp = dict(mining=mining, margin=0.8)
      calls += [("triplet", arrays, hp),
                ("relative_triplet", arrays, dict(hp, weighting="none")),
                ("relative_triplet", arrays, hp)]
  got = np.array(_values(calls)).reshape(-1, 3)
  for plain, none, weighted in got:
    assert plain > 0 and none == pytest.approx(plain, rel=1e-6)
    assert abs(weighted - plain) > 1e-5 * plain


def test_koleo_hand_computed():
  z = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.1], [-3.0, 0.0]])
  zn = _normalize(z)
  d = np.linalg.norm(zn[:, None] - zn[None], axis=-1) + np.diag([np.inf] * 4)
  want = -np.mean(np.log(d.min(1) + 1e-8))
  y = np.array([0, 0, 1, 1])
  koleo, contrastive, both = _values([
      ("koleo", dict(embeddings=z), {}),
      ("contrastive", dict(embeddings=z, labels=y),
       dict(distance="cosine", pos_margin=1.0, neg_margin=0.5)),
      ("contrastive_koleo", dict(embeddings=z, labels=y),
       dict(koleo_weight=0.3)),
  ])
  _close(koleo, want)
  _close(both, contrastive + 0.3 * want)


def _raml_numpy(s, t, v, l1, l2):
  """pavelsuma/raml lib/layers/functional.py, eps = 0: summed over images."""
  s = _normalize(s).reshape(-1, v, s.shape[-1])
  t = _normalize(t).reshape(-1, v, t.shape[-1])
  reg = np.sum(np.mean((1 - (s * t).sum(-1)) ** 2, -1))

  def mse(x1, x2):
    dd = ((x1 - x2) ** 2).sum(0)
    np.fill_diagonal(dd, 0)
    return dd.sum() / (v * (v - 1))

  tt = t @ t.transpose(0, 2, 1)
  return (reg + l1 * mse(s @ t.transpose(0, 2, 1), tt)
          + l2 * mse(s @ s.transpose(0, 2, 1), tt))


def _obd_numpy(s, t, tau, tau_d, omega, lam, progress):
  """ZelongZeng/OBD-SD_Pytorch criteria/multisimilarity_obd_sd.py."""
  s, t = _normalize(s), _normalize(t)
  eye = np.eye(len(s))
  w = _softmax((t @ t.T - 1e9 * eye) / tau_d)
  target = (1 - omega) * np.linalg.inv(eye - omega * w) @ _softmax(
      t @ t.T / tau)
  log_q = np.log(_softmax(s @ s.T / tau))
  kl = np.sum(target * (np.log(target) - log_q)) / len(s)
  return progress * lam * tau**2 * kl


def test_distillation_losses_hand_computed_and_limits():
  rng = np.random.RandomState(0)
  s, t = rng.randn(12, 5), rng.randn(12, 5)
  st = dict(embeddings=s, teacher_embeddings=t)
  same = dict(embeddings=s, teacher_embeddings=s)
  raml_hp = dict(views_per_image=4, lambda1=0.7, lambda2=0.6)
  obd_hp = dict(tau=0.5, tau_d=0.2, omega=0.6, lambda_=3.0)
  plain = dict(obd_hp, omega=0.0)
  modes = ("mse", "cosine", "relational")
  got = _values(
      [("raml", st, dict(raml_hp, reduction="sum")), ("raml", st, raml_hp),
       ("raml", same, raml_hp),
       ("obd_sd", dict(st, progress=0.4), obd_hp),
       ("obd_sd", dict(st, progress=1.0), plain),
       ("obd_sd", dict(same, progress=1.0), plain),
       ("obd_sd", dict(st, progress=0.0), obd_hp)]
      + [("embedding_distill", st, dict(mode=m)) for m in modes]
      + [("embedding_distill", same, dict(mode=m)) for m in modes])
  raml_sum, raml_mean, raml_same, obd, obd_plain, obd_same, obd_off = got[:7]
  distill, distill_same = got[7:10], got[10:]

  want = _raml_numpy(s, t, 4, 0.7, 0.6)
  _close(raml_sum, want)
  _close(raml_mean, want / 3)
  _close(obd, _obd_numpy(s, t, progress=0.4, lam=3.0, tau=0.5, tau_d=0.2,
                         omega=0.6))
  # omega = 0: the target is the plain softmax(T / tau)
  p = _softmax(_normalize(t) @ _normalize(t).T / 0.5)
  q = _softmax(_normalize(s) @ _normalize(s).T / 0.5)
  _close(obd_plain, 3.0 * 0.25 * np.sum(p * np.log(p / q)) / 12)
  cos = np.sum(_normalize(s) * _normalize(t), -1)
  ss, tt = _normalize(s) @ _normalize(s).T, _normalize(t) @ _normalize(t).T
  off = ~np.eye(12, dtype=bool)
  _close(distill, [np.mean((s - t) ** 2), np.mean(1 - cos),
                   np.mean((ss - tt)[off] ** 2)])
  # teacher == student: nothing to distil; progress 0 switches OBD-SD off
  _close([raml_same, obd_same, obd_off] + distill_same, np.zeros(6))
  assert min(raml_sum, obd, obd_plain, *distill) > 1e-3

  # the diffusion target is a distribution per row
  target = losses.obd_sd.diffusion_target(jnp.asarray(tt), tau=0.5,
                                          tau_d=0.2, omega=0.9)
  _close(np.sum(target, 1), np.ones(12))
  # the teacher is frozen
  g = jax.jit(jax.grad(lambda t_: losses.get("raml")(
      embeddings=jnp.asarray(s), teacher_embeddings=t_, **raml_hp)[0]))(
          jnp.asarray(t))
  assert not np.any(np.asarray(g))


# ------------------------------------------------------------- invariances
def test_permutation_and_rotation_invariance():
  rng = np.random.RandomState(0)
  s, t = rng.randn(12, 6), rng.randn(12, 6)
  y, ref, ref_y = rng.randint(0, 4, 12), rng.randn(9, 6), rng.randint(0, 5, 9)
  cases = [
      ("koleo", dict(embeddings=s), {}),
      ("raml", dict(embeddings=s, teacher_embeddings=t),
       dict(views_per_image=3)),
      ("obd_sd", dict(embeddings=s, teacher_embeddings=t, progress=0.5),
       dict(omega=0.5, tau_d=0.3, lambda_=1.0)),
      ("embedding_distill", dict(embeddings=s, teacher_embeddings=t),
       dict(mode="relational")),
      ("relative_triplet", dict(embeddings=s, labels=y, ref_embeddings=ref,
                                ref_labels=ref_y), dict(margin=1.0)),
      ("relative_triplet", dict(embeddings=s, labels=y),
       dict(margin=0.3, distance="cosine", mining="semihard")),
  ]
  q, _ = np.linalg.qr(rng.randn(6, 6))
  calls = []
  for name, arrays, hp in cases:
    # whole images, and views within them, move together for raml
    perm = ((rng.permutation(4)[:, None] * 3 + rng.permutation(3)).ravel()
            if name == "raml" else rng.permutation(12))
    rperm = rng.permutation(9)
    rotated = {k: v @ q if k.endswith("embeddings") else v
               for k, v in arrays.items()}
    permuted = {k: v[rperm] if k.startswith("ref_") else
                (v if np.ndim(v) == 0 else v[perm])
                for k, v in arrays.items()}
    calls += [(name, arrays, hp), (name, rotated, hp), (name, permuted, hp)]
  got = np.array(_values(calls)).reshape(-1, 3)
  for (name, _, _), (orig, rotated, permuted) in zip(cases, got):
    assert orig > 0, name
    _close([rotated, permuted], [orig, orig], msg=name)


# -------------------------------------------------- sharding and NaN safety
SHARD_CONFIGS = [
    ("triplet", dict(mining="all", margin=0.5)),
    ("triplet", dict(mining="hard", margin=0.5, distance="cosine")),
    ("triplet", dict(mining="semihard", margin=0.5)),
    ("relative_triplet", dict(mining="all", margin=0.5)),
    ("contrastive", dict(pos_margin=0.2, neg_margin=2.0)),
    ("contrastive_koleo", {}),
    ("multi_similarity", dict(miner_epsilon=0.1)),
    ("koleo", {}),
    ("embedding_distill", dict(mode="relational")),
    ("raml", dict(views_per_image=4)),
    ("obd_sd", dict(omega=0.5, lambda_=10.0)),
    ("ntxent", {}),
    ("supcon", {}),
    ("proxy_anchor", {}),
    ("proxy_nca", {}),
    ("normalized_softmax", {}),
    ("cosface", {}),
    ("arcface", {}),
    ("subcenter_arcface", dict(sub_centers=2)),
    ("soft_triple", dict(centers_per_class=2)),
    ("circle", {}),
    ("tuplet_margin", {}),
    ("lifted_structure", {}),
    ("generalized_lifted_structure", {}),
    ("margin", {}),
    ("margin", dict(learn_beta=True, nu=0.1, beta_per_class=True)),
    ("npairs", {}),
    ("fast_ap", {}),
    ("smooth_ap", dict(anchor_chunk=4)),
    ("angular", dict(anchor_chunk=4)),
    ("nca", {}),
    ("ranked_list", dict(margin=0.4, Tn=10.0)),
    ("instance", {}),
    ("histogram", dict(n_bins=20)),
    ("pnp", dict(anchor_chunk=4)),
    ("intra_pair_variance", {}),
    ("snr_contrastive", {}),
    ("threshold_consistent_margin", {}),
    ("large_margin_softmax", {}),
    ("sphereface", {}),
    ("p2s_grad", {}),
    ("manifold", dict(K=8)),
    ("vicreg", {}),
    ("dynamic_soft_margin", {}),
]


# SHARD_CONFIGS compile as several programs. XLA's CPU runtime runs the 8
# fake devices' independent collectives on one shared thread pool; one
# program with all the losses holds enough of them at once to fill it with
# threads that each wait in a different rendezvous, which deadlocks: XLA
# aborts after 40 s. All 32 losses in one program aborted in 3 of 5 runs
# from a warm compilation cache; as four programs, in none of 16 (five now,
# for the losses added since, keep each program at that size; eight since
# the reducers made each loss program larger).
SHARD_GROUPS = 8


def _every_loss(batch, group, groups=SHARD_GROUPS):
  """value_and_grad of every registered loss in `group` (every
  `groups`-th of SHARD_CONFIGS), plus, in group 0, a memory variant."""
  e, y, t = batch["embeddings"], batch["labels"], batch["teacher"]
  out = {}
  for i, (name, hp) in enumerate(SHARD_CONFIGS):
    if i % groups != group:
      continue
    # What each loss consumes, as the train step offers it (losses.inputs_for).
    kw = dict(hp, **losses.inputs_for(name, {
        "teacher": t, "progress": batch["progress"],  # traced
        "params": {"proxies": batch["proxies"], "beta": batch["beta"]},
        "state": losses.init_state(name, **hp) if "state" in losses.consumes(name) else None,
        "rng": jax.random.key(0)}, hp))
    if name == "vicreg":
      kw["ref_embeddings"] = t  # the second view
    out[f"{i}-{name}"] = jax.value_and_grad(
        lambda e: losses.get(name)(embeddings=e, labels=y, **kw)[0])(e)
  if group:
    return out
  out["contrastive-memory"] = jax.value_and_grad(
      lambda e: losses.get("contrastive")(
          embeddings=e, labels=y, ref_embeddings=batch["memory"],
          ref_labels=batch["memory_labels"], ref_valid=batch["memory_valid"],
          pos_margin=0.2, neg_margin=2.0)[0])(e)
  # A miner's selection, computed from the (sharded) batch inside the step.
  out["triplet-mined"] = jax.value_and_grad(lambda e: losses.get("triplet")(
      embeddings=e, labels=y, margin=0.5, mined=miners.triplet_margin(
          embeddings=e, labels=y, margin=1.0, type_of_triplets="semihard"))[0])(e)
  return out


def _fake_batch(seed, duplicates=False):
  rng = np.random.RandomState(seed)
  e = rng.randn(16, 8).astype(np.float32)
  if duplicates:
    e[8:] = e[:8]
    e[3] = 0.0
  return {
      "embeddings": e,
      "labels": rng.permutation(np.arange(16) % 4).astype(np.int32),
      "teacher": e if duplicates else e + 0.3 * rng.randn(16, 8).astype(
          np.float32),
      "progress": np.float32(0.5),
      "memory": rng.randn(24, 8).astype(np.float32),
      "memory_labels": rng.randint(0, 4, 24).astype(np.int32),
      "memory_valid": rng.rand(24) > 0.3,
      "proxies": rng.randn(8, 8).astype(np.float32),  # 4 classes x 2 centres, or 8
      "beta": rng.uniform(2.0, 3.0, 4).astype(np.float32),  # margin's, per class
  }


def _put(batch, mesh):
  sharded = ("embeddings", "labels", "teacher")
  return {k: jax.device_put(v, NamedSharding(
      mesh, PartitionSpec("data") if k in sharded else PartitionSpec()))
          for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _every_loss_compiled(num_devices):
  """_every_loss compiled once per mesh and group; both tests below share it.
  Returns batch -> {key: (value, grad)} over all groups."""
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  example = _put(_fake_batch(0), mesh)
  compiled = [jax.jit(functools.partial(_every_loss, group=g)).lower(example).compile(
      {"xla_backend_optimization_level": 0}) for g in range(SHARD_GROUPS)]  # see _run_jit
  return lambda batch: {k: v for run in compiled for k, v in run(_put(batch, mesh)).items()}


def test_sharded_batch_matches_single_device():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
  batch = _fake_batch(0)
  sharded = _every_loss_compiled(8)(batch)
  single = _every_loss_compiled(1)(batch)
  assert sharded["0-triplet"][1].sharding.num_devices == 8
  assert set(sharded) == set(single)
  assert {k.split("-", 1)[1] for k in sharded} >= set(losses.names())
  for key in single:
    _close(sharded[key][0], single[key][0], msg=key)
    _close(sharded[key][1], single[key][1], msg=key)
    assert float(single[key][0]) > 0, key


def test_no_nan_gradients_with_duplicates():
  batch = _fake_batch(1, duplicates=True)
  identical = dict(batch, embeddings=np.tile(batch["embeddings"][:1],
                                             (16, 1)))
  identical["teacher"] = identical["embeddings"]
  for b in (batch, identical):
    for key, (val, grad) in _every_loss_compiled(1)(b).items():
      assert np.isfinite(val) and np.all(np.isfinite(grad)), key


# ------------------------------------------------------------ the contract
def test_registry():
  assert set(losses.names()) == {
      "triplet", "relative_triplet", "contrastive", "contrastive_koleo",
      "multi_similarity", "koleo", "embedding_distill", "raml", "obd_sd",
      "ntxent", "supcon", "proxy_anchor", "proxy_nca", "normalized_softmax", "cosface",
      "arcface", "circle", "tuplet_margin", "lifted_structure", "generalized_lifted_structure",
      "subcenter_arcface", "soft_triple", "margin", "npairs", "fast_ap", "smooth_ap",
      "angular", "nca", "ranked_list", "instance", "histogram", "pnp", "intra_pair_variance",
      "snr_contrastive", "threshold_consistent_margin",
      "large_margin_softmax", "sphereface", "p2s_grad", "manifold", "vicreg",
      "dynamic_soft_margin"}
  with pytest.raises(ValueError, match="triplet.*obd_sd|obd_sd.*triplet"):
    losses.get("tripletz")
  with pytest.raises(ValueError, match="already registered"):
    losses.register("triplet", losses.get("contrastive"))
  losses.register("_test_double", lambda **kw: (2.0, {}))
  try:
    assert losses.get("_test_double")()[0] == 2.0
    assert "_test_double" in losses.names()
  finally:
    losses._REGISTRY.pop("_test_double")


def test_registry_running_state_contract():
  """A loss that consumes "state" gives init_state; it is called with
  loss_state= and returns (loss, aux, new_state)."""
  counter = lambda *, embeddings, labels, loss_state: (
      jnp.mean(embeddings), {}, {"calls": loss_state["calls"] + 1})
  with pytest.raises(ValueError, match="gives init_state"):
    losses.register("_test_counter", counter, consumes=("state",))
  with pytest.raises(ValueError, match="gives init_state"):
    losses.register("_test_counter", counter, consumes=(), init_state=dict)
  losses.register("_test_counter", counter, consumes=("state",),
                  init_state=lambda start=0: {"calls": jnp.asarray(start)})
  try:
    state = losses.init_state("_test_counter", start=2)
    kwargs = losses.inputs_for("_test_counter", {"state": state, "teacher": None})
    assert kwargs == {"loss_state": state}
    _, _, state = losses.get("_test_counter")(embeddings=jnp.ones((2, 3)), labels=None,
                                              **kwargs)
    assert state["calls"] == 3
    with pytest.raises(ValueError, match="consumes 'state', which this config"):
      losses.inputs_for("_test_counter", {})
  finally:
    losses._REGISTRY.pop("_test_counter")
  with pytest.raises(ValueError, match="keeps no running state"):
    losses.init_state("triplet")


def test_bad_arguments():
  e, y = jnp.ones((4, 3)), jnp.arange(4)
  for name in losses.names():
    with pytest.raises(TypeError):
      losses.get(name)(embeddings=e, labels=y, marginn=0.1)
  triplet = losses.get("triplet")
  for kw, match in [
      (dict(distance="manhattan"), "distance"),
      (dict(mining="easy"), "mining"),
      (dict(reduction="median"), "reduction"),  # "sum" is PML's SumReducer
      (dict(ref_embeddings=e), "ref_labels"),
      (dict(ref_labels=y), "without ref_embeddings"),
      (dict(ref_embeddings=e, ref_labels=y, ref_valid=jnp.ones(4)),
       "ref_valid"),
      (dict(labels=jnp.arange(3)), "shape"),
      (dict(labels=jnp.ones(4)), "integer"),
  ]:
    with pytest.raises(ValueError, match=match):
      triplet(**dict(dict(embeddings=e, labels=y), **kw))
  with pytest.raises(ValueError, match="reference set"):
    losses.get("koleo")(embeddings=e, ref_embeddings=e)
  with pytest.raises(ValueError, match="views_per_image"):
    losses.get("raml")(embeddings=e, teacher_embeddings=e, views_per_image=3)
  with pytest.raises(ValueError, match="teacher_embeddings"):
    losses.get("embedding_distill")(embeddings=e, teacher_embeddings=e[:2])


def test_contrastive_per_anchor_sum_by_hand():
  """Sums of 1 - s over positives and [s - 0.5]_+ over negatives, mean over anchors."""
  z = jnp.asarray([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
  y = jnp.asarray([0, 0, 1, 1])
  s = np.asarray(z @ z.T)
  per_anchor = []
  for i in range(4):
    pos = [1 - s[i, j] for j in range(4) if j != i and y[j] == y[i]]
    neg = [max(s[i, j] - 0.5, 0.0) for j in range(4) if y[j] != y[i]]
    per_anchor.append(sum(pos) + sum(neg))
  loss, aux = losses.get("contrastive")(embeddings=z, labels=y, distance="cosine", pos_margin=1.0,
                                        neg_margin=0.5, reduction="per_anchor_sum")
  np.testing.assert_allclose(loss, np.mean(per_anchor), rtol=1e-6)
  np.testing.assert_allclose(aux["pos_loss"] + aux["neg_loss"], loss, rtol=1e-6)
  with pytest.raises(ValueError, match="per_anchor_sum"):
    losses.get("contrastive")(embeddings=z, labels=y, reduction="median")


def test_make_binds_hyperparameters_for_jit_grad_and_vmap():
  """`losses.make` is PML's constructor: hyperparameters bound once, a
  function of arrays left, which jit, grad and vmap take as it is."""
  emb, labels = _batch(4, b=8, d=5, classes=3)
  e, y = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)
  want, _ = losses.get("triplet")(embeddings=e, labels=y, margin=0.3, distance="cosine")
  got, aux = jax.jit(losses.make("triplet", margin=0.3, distance="cosine"))(embeddings=e, labels=y)
  _close(got, want)
  assert "num_triplets" in aux
  grad = jax.grad(losses.make("triplet", margin=0.3, distance="cosine", with_aux=False))(e,
                                                                                         labels=y)
  want_grad, _ = jax.grad(lambda e: losses.get("triplet")(
      embeddings=e, labels=y, margin=0.3, distance="cosine"), has_aux=True)(e)
  _close(grad, want_grad)
  batched = jax.vmap(losses.make("contrastive", with_aux=False))(jnp.stack([e, 2 * e]),
                                                                  labels=jnp.stack([y, y]))
  assert batched.shape == (2,) and bool(jnp.all(jnp.isfinite(batched)))
  with pytest.raises(TypeError, match=r"takes no hyperparameter\(s\) \['margn'\]"):
    losses.make("triplet", margn=0.3)
  with pytest.raises(ValueError, match="Unknown loss 'triplets'"):
    losses.make("triplets")


def test_get_returns_one_function_per_loss_so_jit_caches_hit():
  # jax.jit caches by function identity: a new wrapper per call would
  # recompile a user's `jax.jit(losses.get(name))` every time.
  for name in ("triplet", "arcface", "vicreg"):
    assert losses.get(name) is losses.get(name)
