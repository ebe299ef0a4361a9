"""Tests for jaxdml.models: parameter counts, torch parity, weight import, sharding, options."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")

from jaxdml import models  # noqa: E402
from jaxdml.models import heads, layers  # noqa: E402
from jaxdml.tools import torch_reference as tr

REQUIRED = ["resnet18", "resnet34", "resnet50", "resnet101", "vit_ti16", "vit_s16", "vit_b16",
            "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
            "shufflenet_v2_x2_0", "resnet_tiny", "vit_tiny", "shufflenet_v2_tiny",
            "resnet_small", "vit_small_demo", "two_tower"]
TORCH_COUNTS = {"resnet18": 11_689_512, "resnet50": 25_557_032,
                "shufflenet_v2_x0_5": 1_366_792, "shufflenet_v2_x1_0": 2_278_604,
                "vit_ti16": 5_717_416, "vit_s16": 22_050_664, "vit_b16": 86_567_656}


def _init(model, size, batch=2, seed=0):
  """Variables for `model` without running its init.

  Compiling a real init (one threefry per parameter) costs seconds per model on a
  loaded CPU, far more than the forward pass; the tests need only plausible
  values: He-scaled normal kernels, unit scales/variances, GeM p = 3. The real
  init runs in test_embedding_model_from_classifier_checkpoint.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(seed), x)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name == "p":
      return np.full(leaf.shape, 3.0, np.float32)
    if name in ("bias", "mean"):
      return 0.1 * rng.normal(size=leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 50
    return (rng.normal(size=leaf.shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes), x


def _apply(model, variables, x, **kw):
  """Jitted apply: compiling once is much cheaper than running a ResNet op by op."""
  return jax.jit(functools.partial(model.apply, **kw))(variables, x)


def _images(size, batch=2, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def test_registry():
  assert set(REQUIRED) <= set(models.names())
  with pytest.raises(ValueError, match="Unknown model 'resnet9000'"):
    models.get("resnet9000")
  with pytest.raises(ValueError, match="already registered"):
    models.register("resnet18", lambda **kw: None)
  models.register("test_only_encoder", lambda **kw: models.get("resnet_tiny", **kw))
  try:
    assert models.get("test_only_encoder", embed_dim=4).embed_dim == 4
  finally:
    models._REGISTRY.pop("test_only_encoder")
  with pytest.raises(TypeError, match="resnet_tiny"):
    models.get("resnet_tiny", not_a_field=1)


@pytest.mark.parametrize("name", sorted(TORCH_COUNTS))
def test_param_counts_match_torch(name):
  model = models.get(name, num_classes=1000)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == TORCH_COUNTS[name]


# ---- parity with the torch.nn rebuilds of torchvision / timm ----
@functools.cache
def _torch_model(name):
  if name.startswith("resnet"):
    ref = tr.resnet(name)
  elif name.startswith("shufflenet"):
    ref = tr.shufflenet(name)
  else:
    cfg = {"vit_ti16": (192, 3), "vit_s16": (384, 6)}[name]
    ref = tr.VisionTransformer(embed_dim=cfg[0], num_heads=cfg[1])
  torch.manual_seed(0)
  ref = tr.randomize(ref)
  return ref, tr.state_dict_numpy(ref)


def _jax_logits(name, variables, images, **kw):
  model = models.get(name, num_classes=1000, **kw)
  out, inter = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  return np.asarray(out), inter


def _assert_parity(got, want):
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)
  assert np.abs(want).max() > 1e-2  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("name,size", [
    ("resnet18", 64), ("resnet50", 64), ("shufflenet_v2_x0_5", 64),
    pytest.param("resnet34", 96, marks=pytest.mark.slow),
    pytest.param("resnet101", 64, marks=pytest.mark.slow),
    pytest.param("shufflenet_v2_x1_0", 96, marks=pytest.mark.slow),
])
def test_cnn_parity_with_torchvision(name, size):
  ref, sd = _torch_model(name)
  images = _images(size)
  variables = models.load_torch_weights(name, sd, num_classes=1000)
  got, inter = _jax_logits(name, variables, images)
  _assert_parity(got, tr.forward_nhwc(ref, images))
  assert inter["features"].shape[0] == 2


@pytest.mark.parametrize("name", ["vit_ti16", pytest.param("vit_s16", marks=pytest.mark.slow)])
def test_vit_parity_with_timm_224(name):
  ref, sd = _torch_model(name)
  images = _images(224, batch=1)
  variables = models.load_torch_weights(name, sd, num_classes=1000)
  got, inter = _jax_logits(name, variables, images)
  _assert_parity(got, tr.forward_nhwc(ref, images))
  assert inter["features"].shape == (1, 192 if name == "vit_ti16" else 384)


def test_vit_parity_interpolated_pos_embed():
  """Weights at 224 used at 32 px: pos_embed resampled as timm does (bicubic, antialias)."""
  ref, sd = _torch_model("vit_ti16")
  small = tr.VisionTransformer(img_size=32, embed_dim=192, num_heads=3).eval()
  sd32 = dict(sd, pos_embed=tr.resample_abs_pos_embed(torch.from_numpy(sd["pos_embed"]),
                                                      (2, 2)).numpy())
  small.load_state_dict({k: torch.from_numpy(v) for k, v in sd32.items()})
  images = _images(32)
  want = tr.forward_nhwc(small, images)
  variables, report = models.load_torch_weights("vit_ti16", sd, strict=False, num_classes=1000,
                                                image_size=32)
  assert report["resampled"] == ["pos_embed"] and not report["unused"] and not report["missing"]
  assert variables["params"]["pos_embed"].shape == (1, 5, 192)
  _assert_parity(_jax_logits("vit_ti16", variables, images, image_size=32)[0], want)
  # The same resampling happens on the fly when 224 weights meet 32 px images.
  v224 = models.load_torch_weights("vit_ti16", sd, num_classes=1000)
  _assert_parity(_jax_logits("vit_ti16", v224, images)[0], want)


# ---- weight import: files and reporting ----
def test_files_load_like_the_dict(tmp_path):
  _, sd = _torch_model("shufflenet_v2_x0_5")
  from safetensors.numpy import save_file
  np.savez(tmp_path / "w.npz", **sd)
  save_file(sd, str(tmp_path / "w.safetensors"))
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "w.pth")
  want = models.load_torch_weights("shufflenet_v2_x0_5", sd, num_classes=1000)
  for f in ("w.npz", "w.safetensors", "w.pth"):
    got = models.load_torch_weights("shufflenet_v2_x0_5", tmp_path / f, num_classes=1000)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(ValueError, match="unsupported weights file"):
    (tmp_path / "w.txt").write_text("")
    models.load_torch_weights("shufflenet_v2_x0_5", tmp_path / "w.txt")


def test_key_reporting():
  _, sd = _torch_model("resnet18")
  extra = dict(sd, **{"layer9.0.conv1.weight": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match=r"layer9\.0\.conv1\.weight"):
    models.load_torch_weights("resnet18", extra, num_classes=1000)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
  with pytest.raises(ValueError, match=r"layer2\.1\.bn1\.running_var"):
    models.load_torch_weights("resnet18", missing, num_classes=1000)
  wrong = dict(sd, **{"layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"shape mismatch for 'layer1\.0\.conv2\.weight'"):
    models.load_torch_weights("resnet18", wrong, num_classes=1000)
  # strict=False reports instead of raising (a missing key would cost a full init).
  variables, report = models.load_torch_weights("resnet18", extra, strict=False,
                                                num_classes=1000)
  assert report["unused"] == ["layer9.0.conv1.weight"] and report["missing"] == []
  np.testing.assert_array_equal(variables["params"]["fc"]["bias"], sd["fc.bias"])


def test_embedding_model_from_classifier_checkpoint():
  """ImageNet classifier weights into a GeM + 512-d model: fc dropped, head fresh."""
  _, sd = _torch_model("resnet18")
  variables, report = models.load_torch_weights("resnet18", sd, strict=False, embed_dim=32,
                                                pooling="gem")
  assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
  assert sorted(report["fresh"]) == ["embed_head.p", "embed_head.proj.bias",
                                     "embed_head.proj.weight"]
  assert not report["unused"] and not report["missing"]
  np.testing.assert_array_equal(variables["params"]["embed_head"]["p"], [3.0])
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  out, _ = _apply(models.get("resnet18", embed_dim=32, pooling="gem"), variables, _images(32))
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


# ---- sharding, BN, heads, options on the tiny variants ----
@pytest.mark.parametrize("name", ["resnet_tiny", "shufflenet_v2_tiny", "vit_tiny"])
def test_sharded_matches_single_device(name):
  model = models.get(name, embed_dim=16, head_norm="bn")
  variables, _ = _init(model, 32)
  images = _images(32, batch=16)

  def run(devices):
    mesh = Mesh(np.array(devices), ("data",))
    f = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    (out, _), upd = f(variables, images)
    return np.asarray(out), jax.tree.map(np.asarray, upd)

  out1, upd1 = run(jax.devices()[:1])
  out8, upd8 = run(jax.devices()[:8])
  assert len(jax.devices()) >= 8
  # Loose: the BN head divides by small per-dim stds, amplifying summation-order noise;
  # per-shard (unsynchronised) statistics would be off by O(1).
  np.testing.assert_allclose(out8, out1, atol=1e-3, rtol=1e-3)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4), upd8, upd1)
  # train-mode BN head: batch statistics, so each embedding dim is standardised.
  bn = variables["params"]["embed_head"]["bn"]
  np.testing.assert_allclose(out1.mean(0), bn["bias"], atol=1e-4)
  np.testing.assert_allclose(out1.var(0), np.square(bn["scale"]), atol=1e-2)


def test_frozen_bn_keeps_running_stats_and_trains_affine():
  frozen = models.get("resnet_tiny", frozen_bn=True, embed_dim=8)
  variables, images = _init(frozen, 32, batch=4)

  def loss(params, model):
    (out, _), upd = model.apply({**variables, "params": params}, images, train=True,
                                mutable=["batch_stats"])
    return jnp.sum(out[:, 0]), (out, upd)
  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (out_train, upd)), grads = step(variables["params"], frozen)
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(out_train, _apply(frozen, variables, images)[0], atol=1e-5)
  assert np.abs(grads["layer1_0"]["bn1"]["scale"]).max() > 0
  # Control: without frozen_bn the same step moves the statistics.
  (_, (_, upd)), _ = step(variables["params"], models.get("resnet_tiny", embed_dim=8))
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5"])
def test_train_mode_gradients_match_torch(name):
  """Gradients in training mode (batch statistics) equal torch's on the same weights.

  Both sides run in float64: in float32 the rounding grows along the backward
  pass through many training-mode BatchNorms (1-2.5 % for the stem's tensors,
  varying with XLA's threading between runs), which left no tolerance that was
  both stable and sharp. In float64 the worst tensor is ~4e-5 (ShuffleNet's
  depthwise backward accumulates in float32 by design); a wrong rule is O(1).
  Parameters whose true gradient is zero (a BatchNorm bias followed by a
  linear layer and another BatchNorm, in ShuffleNet) hold only float noise
  on both sides and are skipped.
  """
  import flax
  from jaxdml.models import torch_import
  import copy
  cached, sd = _torch_model(name)
  # A float64 copy holding exactly `sd`: training mode moves running
  # statistics, and the cached module is shared with the other parity tests.
  ref = copy.deepcopy(cached).double()
  ref.load_state_dict({k: torch.from_numpy(v).double() for k, v in sd.items()})
  ref.train()
  x = _images(64, batch=4).astype(np.float64)
  torch.sin(ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))).sum().backward()
  torch_grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                             models.load_torch_weights(name, sd, num_classes=1000))
    model = models.get(name, num_classes=1000, dtype=jnp.float64)

    def loss(params):
      (out, _), _ = model.apply(dict(variables, params=params), jnp.asarray(x), train=True,
                                mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out))
    grads = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(variables["params"]))
  errors = {}
  for path, got in flax.traverse_util.flatten_dict(grads).items():
    want = torch_grads[torch_import.torch_key(("params",) + path)]
    if np.max(np.abs(want)) < 1e-3:
      continue
    assert got.dtype == np.float64, path
    if path[-1] == "kernel":
      got = got.transpose(3, 2, 0, 1) if got.ndim == 4 else got.T
    errors[path] = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert len(errors) > 0.8 * len(torch_grads)
  assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda kv: kv[1])


def test_batchnorm_matches_torch_training_step():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(6, 5, 5, 4)).astype(np.float32)
  bn = layers.BatchNorm()
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
  tbn = torch.nn.BatchNorm2d(4).train()
  want = tbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(y, want, atol=1e-4)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name,kw,dim", [
    ("resnet_tiny", dict(pooling="avgmax", embed_dim=16, head_norm="l2"), 16),
    ("shufflenet_v2_tiny", dict(pooling="gem", head_norm="l2"), 128),
    ("vit_tiny", dict(pooling="avg", embed_dim=12, head_norm="l2"), 12),
])
def test_head_shapes_and_l2(name, kw, dim):
  model = models.get(name, **kw)
  variables, x = _init(model, 32, batch=3)
  out, inter = _apply(model, variables, x)
  assert out.shape == (3, dim) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  assert inter["features"].ndim == 2


def test_head_none_returns_pooled_features_and_bad_options_raise():
  model = models.get("resnet_tiny", head_norm="none")
  variables, x = _init(model, 32)
  out, inter = _apply(model, variables, x)
  np.testing.assert_array_equal(out, inter["features"])
  assert out.shape == (2, 64)
  with pytest.raises(ValueError, match="pooling='cls'"):
    _init(models.get("resnet_tiny", pooling="cls"), 32)
  with pytest.raises(ValueError, match="head_norm"):
    _init(models.get("vit_tiny", head_norm="batch"), 32)
  with pytest.raises(ValueError, match="exclusive"):
    _init(models.get("vit_tiny", num_classes=3, embed_dim=4), 32)


def test_pooling_formulas():
  local = np.random.default_rng(0).uniform(0.1, 2.0, size=(2, 7, 3)).astype(np.float32)
  np.testing.assert_allclose(heads.pool(local, kind="avgmax"),
                             local.mean(1) + local.max(1), rtol=1e-6)
  np.testing.assert_allclose(heads.pool(local, kind="gem", p=3.0),
                             np.mean(local ** 3, 1) ** (1 / 3), rtol=1e-5)
  np.testing.assert_allclose(heads.pool(local, kind="gem", p=1.0), local.mean(1), rtol=1e-5)
  gem = np.mean(local ** 3, 1) ** (1 / 3)
  np.testing.assert_allclose(heads.pool(local, kind="gem_l2", p=3.0),
                             gem / np.linalg.norm(gem, axis=1, keepdims=True), rtol=1e-5)


def test_gem_l2_head_normalises_before_the_projection():
  model = models.get("resnet_tiny", embed_dim=8, pooling="gem_l2", head_norm="none")
  variables, images = _init(model, 32)
  assert "p" in variables["params"][heads.HEAD_NAME]
  out, inter = _apply(model, variables, images)
  np.testing.assert_allclose(np.linalg.norm(inter["features"], axis=1), 1.0, rtol=1e-5)
  # Scaling every pooled vector would change a plain GeM head's output, not this one.
  proj = variables["params"][heads.HEAD_NAME]["proj"]
  np.testing.assert_allclose(out, inter["features"] @ proj["kernel"] + proj["bias"], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_tiny"])
def test_remat_and_bfloat16(name):
  base = models.get(name, embed_dim=8)
  variables, x = _init(base, 32)

  def grads(model):
    def loss(p):
      (out, _), _ = model.apply({**variables, "params": p}, x, train=True,
                                mutable=["batch_stats"])
      return jnp.sum(out * jnp.arange(8.0))
    return jax.jit(jax.grad(loss))(variables["params"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), grads(base),
               grads(models.get(name, embed_dim=8, remat=True)))
  bf16 = models.get(name, embed_dim=8, dtype=jnp.bfloat16)
  out16, _ = _apply(bf16, variables, x)
  out32, _ = _apply(base, variables, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=5e-2)
  assert jax.tree.map(lambda a: a.dtype, jax.eval_shape(
      functools.partial(bf16.init, train=False), jax.random.key(0), x)["params"]) == \
      jax.tree.map(lambda a: a.dtype, variables["params"])


# bf16 keeps 8 mantissa bits; through a dozen layers of a random-init network
# an L2-normalised embedding moves by up to a few 1e-2 per coordinate. Stated
# bound: cosine similarity to the float32 embedding >= 0.995 per image, or
# for a network that is itself that sensitive, bf16 moves it at most
# BF16_NOISE_FACTOR times as far as a float32 run with 0.4 % noise (bf16's
# relative precision) on its input. The case: ShuffleNetV2 x1.0 in train
# mode at random init. Its 16 blocks with batch statistics amplify any
# perturbation, bf16's or not. At 64 px, batch 4, input noise alone gives
# cosine ~0.984 in pure float32 and bf16 0.956-0.962. At batch 16 these are
# 0.962 and 0.861; at 224 px bf16 gives 0.991. ResNet-18 gives 0.9997 for both.
BF16_MIN_COSINE = 0.995
BF16_NOISE_FACTOR = 4


@pytest.mark.parametrize("name,size", [
    ("resnet_tiny", 32), ("resnet_small", 64), ("shufflenet_v2_tiny", 32),
    ("vit_tiny", 32), ("vit_small_demo", 64),
    pytest.param("resnet18", 64, marks=pytest.mark.slow),
    pytest.param("shufflenet_v2_x1_0", 64, marks=pytest.mark.slow),
    pytest.param("vit_ti16", 64, marks=pytest.mark.slow)])
def test_bfloat16_embeddings_are_close_to_float32(name, size):
  """Same float32 parameters, bf16 compute: embeddings within the stated bound,
  in eval and in train mode (batch statistics), and float32 out."""
  f32 = models.get(name, embed_dim=16)
  bf16 = models.get(name, embed_dim=16, dtype="bfloat16")
  variables, x = _init(f32, size, batch=4)
  noisy = x + 0.004 * jnp.std(x) * jax.random.normal(jax.random.key(1), x.shape)
  for train in (False, True):
    kw = dict(train=True, mutable=["batch_stats"]) if train else {}
    # In train mode apply returns ((output, intermediates), updated statistics).
    out32, out16, out_noisy = (_apply(m, variables, inputs, **kw)[0]
                               for m, inputs in ((f32, x), (bf16, x), (f32, noisy)))
    out32, out16, out_noisy = (out[0] if train else out for out in (out32, out16, out_noisy))
    assert out16.dtype == jnp.float32
    cosine = np.sum(np.asarray(out16) * np.asarray(out32), -1)
    sensitivity = 1 - np.sum(np.asarray(out_noisy) * np.asarray(out32), -1).min()
    bound = min(BF16_MIN_COSINE, 1 - BF16_NOISE_FACTOR * sensitivity)
    assert cosine.min() >= bound, (name, train, cosine, sensitivity)


def test_two_tower():
  model = models.get("two_tower", query=dict(name="shufflenet_v2_tiny", embed_dim=8),
                     gallery=dict(name="resnet_tiny", embed_dim=8, head_norm="bn"))
  sketches, photos = _images(32, 4, seed=2), _images(32, 4, seed=3)
  # Towers' variables assemble under "query"/"gallery" (as documented for loaded weights).
  vq, _ = _init(model.query, 32)
  vg, _ = _init(model.gallery, 32)
  variables = {c: {"query": vq.get(c, {}), "gallery": vg[c]} for c in ("params", "batch_stats")}
  shapes = jax.eval_shape(model.init, jax.random.key(0), sketches, photos)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert set(variables["params"]) == {"query", "gallery"}
  step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  (out, inter), upd = step(variables, sketches, photos)
  assert out["query"].shape == out["gallery"].shape == (4, 8)
  assert set(inter) == {"query", "gallery"} and set(upd["batch_stats"]) == {"query", "gallery"}
  out, _ = jax.jit(model.apply)(variables, sketches, photos)
  q, _ = jax.jit(functools.partial(model.apply, method="embed_query"))(variables, sketches)
  np.testing.assert_allclose(q, out["query"], atol=1e-6)
  with pytest.raises(ValueError, match="'name'"):
    models.get("two_tower", query=dict(embed_dim=8), gallery=dict(name="resnet_tiny"))


@pytest.mark.parametrize("stride,size", [(1, 9), (2, 9), (2, 8)])
def test_fast_conv_and_pool_match_xla_ops_in_value_and_gradient(stride, size):
  """The CPU lowering's rewrites (depthwise as shifted multiply-adds, im2col
  stems, separable max pool) must equal the XLA ops GPU and TPU lower to
  (`test_lowering.py` checks which runs where), gradients too."""
  import flax.linen as nn
  rng = np.random.default_rng(stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
  dw = jnp.asarray(rng.normal(size=(3, 3, 6)), jnp.float32)
  stem = jnp.asarray(rng.normal(size=(7, 7, 6, 4)), jnp.float32)
  pairs = {
      "depthwise": (
          lambda x, k: layers.depthwise_conv(x, k, strides=stride, padding=1),
          lambda x, k: layers._xla_conv(x, k[:, :, None, :], strides=stride, padding=1,
                                        groups=6), dw),
      "im2col": (
          lambda x, k: layers._im2col_conv(x, k, strides=stride, padding=3),
          lambda x, k: layers._xla_conv(x, k, strides=stride, padding=3, groups=1), stem),
  }
  for name, (fast, reference, kernel) in pairs.items():
    np.testing.assert_allclose(fast(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5,
                               err_msg=name)
    loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))
    for g_fast, g_ref in zip(jax.grad(loss(fast), (0, 1))(x, kernel),
                             jax.grad(loss(reference), (0, 1))(x, kernel)):
      np.testing.assert_allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4, err_msg=name)
  # Continuous random inputs have no ties, so max pooling's gradient is unique.
  pool_ref = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  separable = layers._separable_max_pool_3x3_s2
  np.testing.assert_allclose(separable(x), pool_ref(x), atol=1e-6)
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(jnp.sin(separable(x))))(x),
      jax.grad(lambda x: jnp.sum(jnp.sin(pool_ref(x))))(x), atol=1e-5)


@pytest.mark.parametrize("k,padding,stride", [(5, 2, 2), (3, 0, 1), (5, 1, 3)])
def test_depthwise_gradient_is_the_transposed_convolution(k, padding, stride):
  """depthwise_conv's hand-written backward, at other kernel sizes, paddings
  and strides than ShuffleNet's 3x3/pad 1, equals autodiff of XLA's grouped conv."""
  from jax import lax
  rng = np.random.default_rng(k * 100 + padding * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, 11, 10, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 4)), jnp.float32)
  fast = lambda x, w: layers.depthwise_conv(x, w, strides=stride, padding=padding)
  reference = lambda x, w: lax.conv_general_dilated(
      x, w[:, :, None, :], (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
  cotangent = jnp.asarray(rng.normal(size=reference(x, kernel).shape), jnp.float32)
  grads = [jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, kernel)
           for f in (fast, reference)]
  for g_fast, g_ref in zip(*grads):
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="padding 3 exceeds"):
    layers.depthwise_conv(x, jnp.ones((3, 3, 4)), strides=1, padding=3)
