"""DINOv2, CLIP ViT and ConvNeXt encoders in timm's layout.

Always on, without timm: every new model's parameter count and its full
(key, shape) list, as timm reports them (`TIMM_TABLE`, recorded by
`timm_table()`), checked with `jax.eval_shape`; random timm-keyed state
dicts loading into the tiny variants, from timm's, open_clip's and DINOv2's
layouts; the position-embedding resize against torch's `F.interpolate`; one
train step per family. Opt-in (`-m slow`, skipped unless `import timm`
works): logits equal timm's and open_clip's on random weights, and the table
is re-recorded and compared.
"""
import functools
import hashlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdml import build, models, sharding, train  # noqa: E402
from jaxdml import config as config_lib  # noqa: E402
from jaxdml.tools import bench  # noqa: E402
from jaxdml.models import pos_embed, torch_import  # noqa: E402
from test_lowering import convolutions, lowered  # noqa: E402

_IN1K = dict(num_classes=1000)
_AT_224 = dict(img_size=224, num_classes=1000)  # timm's DINOv2 default is 518 px
_TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
# label: (jaxdml name, its kwargs, timm model name or class, timm kwargs).
# "/features" is timm's num_classes=0 (no classifier), "/proj" CLIP's image
# projection (timm's head with num_classes=512 or 768, our default).
SPECS = {
    "dinov2_vit_s14": ("dinov2_vit_s14", _IN1K, "vit_small_patch14_dinov2", _AT_224),
    "dinov2_vit_s14/features": ("dinov2_vit_s14", {}, "vit_small_patch14_dinov2",
                                dict(img_size=224, num_classes=0)),
    "dinov2_vit_b14": ("dinov2_vit_b14", _IN1K, "vit_base_patch14_dinov2", _AT_224),
    "dinov2_vit_l14": ("dinov2_vit_l14", _IN1K, "vit_large_patch14_dinov2", _AT_224),
    "dinov2_vit_s14_reg4": ("dinov2_vit_s14_reg4", _IN1K, "vit_small_patch14_reg4_dinov2",
                            _AT_224),
    "dinov2_vit_b14_reg4": ("dinov2_vit_b14_reg4", _IN1K, "vit_base_patch14_reg4_dinov2",
                            _AT_224),
    "dinov2_vit_l14_reg4": ("dinov2_vit_l14_reg4", _IN1K, "vit_large_patch14_reg4_dinov2",
                            _AT_224),
    "clip_vit_b16": ("clip_vit_b16", _IN1K, "vit_base_patch16_clip_224", _IN1K),
    "clip_vit_b16/proj": ("clip_vit_b16", {}, "vit_base_patch16_clip_224",
                          dict(num_classes=512)),
    "clip_vit_b32/proj": ("clip_vit_b32", {}, "vit_base_patch32_clip_224",
                          dict(num_classes=512)),
    "clip_vit_l14/proj": ("clip_vit_l14", {}, "vit_large_patch14_clip_224",
                          dict(num_classes=768)),
    "clip_vit_b16_quickgelu/proj": ("clip_vit_b16_quickgelu", {},
                                    "vit_base_patch16_clip_quickgelu_224", dict(num_classes=512)),
    "clip_vit_b32_quickgelu/proj": ("clip_vit_b32_quickgelu", {},
                                    "vit_base_patch32_clip_quickgelu_224", dict(num_classes=512)),
    "clip_vit_l14_quickgelu/proj": ("clip_vit_l14_quickgelu", {},
                                    "vit_large_patch14_clip_quickgelu_224", dict(num_classes=768)),
    "convnext_tiny": ("convnext_tiny", _IN1K, "convnext_tiny", _IN1K),
    "convnext_tiny/features": ("convnext_tiny", {}, "convnext_tiny", dict(num_classes=0)),
    "convnext_small": ("convnext_small", _IN1K, "convnext_small", _IN1K),
    "convnext_base": ("convnext_base", _IN1K, "convnext_base", _IN1K),
    # The tiny variants are timm's classes at the same (small) settings.
    "dinov2_vit_tiny": ("dinov2_vit_tiny", dict(num_classes=10), "VisionTransformer",
                        dict(_TINY_VIT, init_values=1e-5, num_classes=10)),
    "dinov2_vit_tiny_reg4": ("dinov2_vit_tiny_reg4", dict(num_classes=10), "VisionTransformer",
                             dict(_TINY_VIT, init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                  num_classes=10)),
    "clip_vit_tiny/proj": ("clip_vit_tiny", {}, "VisionTransformer",
                           dict(_TINY_VIT, pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu",
                                num_classes=16)),
    "convnext_test": ("convnext_test", dict(num_classes=10), "ConvNeXt",
                      dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10)),
}
# label: (parameter count, sha256 of the sorted "key:shape" lines, first 16
# hex digits). Recorded with timm 1.0.31 (torch 2.14.1) by, in tests/:
#   /work/venv-timm/bin/python -c "import test_backbones as t; print(t.timm_table())"
# with PYTHONPATH=<checkout> (test_timm_table_is_current re-records it).
TIMM_TABLE = {
    "dinov2_vit_s14": (22013800, "613da1ab8d75b458"),
    "dinov2_vit_s14/features": (21628800, "43fab20cd698042e"),
    "dinov2_vit_b14": (86493928, "7725ce55190794de"),
    "dinov2_vit_l14": (304252904, "1ad887d2127cb8d9"),
    "dinov2_vit_s14_reg4": (22014952, "8dd29a1b9f9a5deb"),
    "dinov2_vit_b14_reg4": (86496232, "807191b4a18ac33b"),
    "dinov2_vit_l14_reg4": (304255976, "5a39136aad74f3cf"),
    "clip_vit_b16": (86568424, "bbfa222b01ae5be8"),
    "clip_vit_b16/proj": (86193152, "c86c99e46108842f"),
    "clip_vit_b32/proj": (87849728, "55f2e6148bea4572"),
    "clip_vit_l14/proj": (303966976, "293e80f619f248a9"),
    "clip_vit_b16_quickgelu/proj": (86193152, "c86c99e46108842f"),
    "clip_vit_b32_quickgelu/proj": (87849728, "55f2e6148bea4572"),
    "clip_vit_l14_quickgelu/proj": (303966976, "293e80f619f248a9"),
    "convnext_tiny": (28589128, "b7c9aaa90fb80530"),
    "convnext_tiny/features": (27820128, "4efe82467bf69304"),
    "convnext_small": (50223688, "dbc787bff49dde23"),
    "convnext_base": (88591464, "cab3d96797ff8abb"),
    "dinov2_vit_tiny": (29610, "05c82d009ecf92dc"),
    "dinov2_vit_tiny_reg4": (29706, "5e65d5c6cf0ab290"),
    "clip_vit_tiny/proj": (29712, "7b7ea8fb964f7f49"),
    "convnext_test": (26090, "63c1db78190e5893"),
}


def timm_table() -> dict:
  """`{label: (count, digest)}` of timm's models in SPECS (needs timm)."""
  out = {}
  for label in SPECS:
    with torch.device("meta"):  # shapes only: no memory, no init time
      model = _timm_model(label)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out[label] = (sum(p.numel() for p in model.parameters()), _digest(shapes))
  return out


def _timm_model(label: str, **overrides):
  """timm's model of `label` (`overrides` on its kwargs), random-initialised by timm."""
  timm = pytest.importorskip("timm")
  from timm.layers import LayerNorm
  _, _, timm_name, kwargs = SPECS[label]
  kwargs = {**kwargs, **overrides}
  if timm_name == "VisionTransformer":
    eps = kwargs.pop("norm_eps", 1e-6)
    return timm.models.VisionTransformer(norm_layer=functools.partial(LayerNorm, eps=eps),
                                         **kwargs)
  if timm_name == "ConvNeXt":
    return timm.models.ConvNeXt(**kwargs)
  return timm.create_model(timm_name, pretrained=False, **kwargs)


def _digest(shapes: dict) -> str:
  lines = "".join(f"{k}:{list(shape)}\n" for k, shape in sorted(shapes.items()))
  return hashlib.sha256(lines.encode()).hexdigest()[:16]


@functools.cache
def _torch_shapes(label: str) -> dict:
  """`{timm key: torch-layout shape}` of the jaxdml model of `label`, by eval_shape."""
  name, kwargs, _, _ = SPECS[label]
  model = models.get(name, **kwargs)
  size = model.image_size
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, size, size, 3)))
  return {torch_import.torch_key(path): torch_import._torch_shape(leaf.shape, path[-1])
          for path, leaf in flax.traverse_util.flatten_dict(variables).items()}


@pytest.mark.parametrize("label", sorted(SPECS))
def test_counts_keys_and_shapes_match_timm(label):
  shapes = _torch_shapes(label)
  count = sum(int(np.prod(s)) for s in shapes.values())
  assert (count, _digest(shapes)) == TIMM_TABLE[label], sorted(shapes.items())


# ---- loading timm's, open_clip's and DINOv2's state dicts ----
TINY = ("dinov2_vit_tiny", "dinov2_vit_tiny_reg4", "clip_vit_tiny/proj", "convnext_test")


def _random_state_dict(label: str, seed: int = 0) -> dict:
  """Seeded random float32 arrays under timm's keys, in torch's layouts."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0.0, 0.5, size=shape).astype(np.float32)
          for k, shape in sorted(_torch_shapes(label).items())}


def _as_torch_layout(path, value):
  value = np.asarray(value)
  if path[-1] == "kernel":
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


@functools.cache
def _jit_apply(name: str, **kwargs):
  model = models.get(name, **kwargs)
  return model, jax.jit(functools.partial(model.apply, train=False))


def _images(size, batch=2, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("label", TINY)
def test_timm_state_dict_loads_key_for_key(label):
  """Every timm key lands on its Flax variable (transposed where torch's
  layout differs), the classifier and the embedding model both load, and
  the embedding is the classifier's pooled features, normalised."""
  name, kwargs, _, _ = SPECS[label]
  sd = _random_state_dict(label)
  variables = models.load_torch_weights(name, sd, **kwargs)
  flat = flax.traverse_util.flatten_dict(variables)
  assert sorted(torch_import.torch_key(p) for p in flat) == sorted(sd)
  for path, value in flat.items():
    np.testing.assert_array_equal(_as_torch_layout(path, value), sd[torch_import.torch_key(path)])

  embedder, report = models.load_torch_weights(name, sd, strict=False, head_norm="l2")
  assert not report["unused"] and not report["missing"] and report["layout"] == "timm"
  # CLIP's head is its projection, part of the embedding model; the others' is a classifier.
  classifier = {"head.weight", "head.bias", "head.fc.weight", "head.fc.bias"} & set(sd)
  assert set(report["dropped"]) == (set() if "proj" in label else classifier)
  images = _images(models.get(name).image_size)
  model, apply = _jit_apply(name, **kwargs)
  out, inter = apply(variables, images)
  assert np.isfinite(out).all() and out.shape[0] == 2
  emb, emb_inter = _jit_apply(name, head_norm="l2")[1](embedder, images)
  features = np.asarray(emb_inter["features"])
  np.testing.assert_allclose(emb, features / np.linalg.norm(features, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  if "proj" not in label:
    np.testing.assert_allclose(features, inter["features"], rtol=1e-5, atol=1e-5)
    head = variables["params"]["head"]
    head = head.get("fc", head)
    np.testing.assert_allclose(out, features @ head["kernel"] + head["bias"], rtol=1e-4,
                               atol=1e-4)


def _torch_resize(pos, grid, prefix, antialias):
  """timm's resample_abs_pos_embed, spelled with torch's F.interpolate (float64)."""
  d, old = pos.shape[-1], int(round((pos.shape[1] - prefix) ** 0.5))
  patches = torch.from_numpy(pos[:, prefix:].astype(np.float64))
  patches = patches.reshape(1, old, old, d).permute(0, 3, 1, 2)
  patches = torch.nn.functional.interpolate(patches, size=grid, mode="bicubic",
                                            antialias=antialias, align_corners=False)
  patches = patches.permute(0, 2, 3, 1).reshape(1, -1, d).numpy()
  return np.concatenate([pos[:, :prefix], patches], 1)


@pytest.mark.parametrize("antialias", [True, False])
def test_pos_embed_resize_matches_torch_interpolate(antialias):
  """DINOv2's 518 px table (37x37) at 224 px (16x16), CLS kept or no prefix
  (registers), upsampling with 5 prefix rows, and small odd grids."""
  rng = np.random.default_rng(0)
  for old, new, prefix in [(37, 16, 1), (37, 16, 0), (16, 37, 5), (14, 2, 1), (7, 9, 0)]:
    pos = rng.normal(size=(1, prefix + old * old, 6)).astype(np.float32)
    got = pos_embed.resample_pos_embed(pos, (new, new), num_prefix_tokens=prefix,
                                       antialias=antialias)
    want = _torch_resize(pos, (new, new), prefix, antialias)
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str((old, new, prefix)))
  with pytest.raises(ValueError, match="square patch grid"):
    pos_embed.resample_pos_embed(pos[:, :48], (4, 4), num_prefix_tokens=0)


@pytest.mark.parametrize("label", ["dinov2_vit_tiny", "dinov2_vit_tiny_reg4"])
def test_checkpoint_pos_embed_is_resized_on_load(label):
  """A checkpoint made at 64 px (16x16 patches) loads into the 32 px model
  (8x8): CLS row kept (no prefix rows with registers), patches resized as
  timm's checkpoint filter does (antialiased), or plain bicubic if asked."""
  name, kwargs, _, _ = SPECS[label]
  sd = _random_state_dict(label)
  prefix = models.get(name).num_pos_prefix_tokens
  sd["pos_embed"] = np.random.default_rng(3).normal(size=(1, prefix + 256, 32)).astype(np.float32)
  for antialias in (True, False):
    variables, report = models.load_torch_weights(name, sd, strict=False, **kwargs,
                                                  pos_embed_antialias=antialias)
    assert report["resampled"] == ["pos_embed"] and not report["unused"]
    np.testing.assert_allclose(variables["params"]["pos_embed"],
                               _torch_resize(sd["pos_embed"], (8, 8), prefix, antialias),
                               atol=2e-5)


def test_original_dinov2_checkpoint_layout():
  """facebookresearch/dinov2 keys: `mask_token` dropped; with registers the
  CLS row of `pos_embed` is folded into `cls_token` (timm's conversion)."""
  for label in ("dinov2_vit_tiny", "dinov2_vit_tiny_reg4"):
    name, kwargs, _, _ = SPECS[label]
    sd = _random_state_dict(label)
    original = dict(sd, mask_token=np.ones((1, 32), np.float32))
    if "reg4" in label:
      cls_pos = np.random.default_rng(4).normal(size=(1, 1, 32)).astype(np.float32)
      original["register_tokens"] = original.pop("reg_token")
      original["cls_token"] = sd["cls_token"] - cls_pos
      original["pos_embed"] = np.concatenate([cls_pos, sd["pos_embed"]], 1)
    got, report = models.load_torch_weights(name, original, strict=False, **kwargs)
    assert (report["layout"], report["dropped"], report["unused"]) == ("dinov2", ["mask_token"], [])
    want = models.load_torch_weights(name, sd, **kwargs)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), got, want)


def test_open_clip_checkpoint_layout():
  """open_clip's `visual.*` keys (OpenAI's layout) load as timm's: `proj`
  [D, E] is the projection `head` with a zero bias; the text tower is dropped."""
  sd = _random_state_dict("clip_vit_tiny/proj")
  sd["head.bias"] = np.zeros_like(sd["head.bias"])
  oc = {"visual.conv1.weight": sd["patch_embed.proj.weight"],
        "visual.class_embedding": sd["cls_token"][0, 0],
        "visual.positional_embedding": sd["pos_embed"][0],
        "visual.proj": sd["head.weight"].T}
  for ours, theirs in [("norm_pre", "ln_pre"), ("norm", "ln_post")]:
    for leaf in ("weight", "bias"):
      oc[f"visual.{theirs}.{leaf}"] = sd[f"{ours}.{leaf}"]
  for i in range(2):
    for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("attn.proj", "attn.out_proj")]:
      for leaf in ("weight", "bias"):
        oc[f"visual.transformer.resblocks.{i}.{theirs}.{leaf}"] = sd[f"blocks.{i}.{ours}.{leaf}"]
    for leaf in ("weight", "bias"):
      oc[f"visual.transformer.resblocks.{i}.attn.in_proj_{leaf}"] = \
          sd[f"blocks.{i}.attn.qkv.{leaf}"]
  text = {"token_embedding.weight": np.zeros((8, 4), np.float32),
          "transformer.resblocks.0.attn.in_proj_weight": np.zeros((12, 4), np.float32),
          "text_projection": np.zeros((4, 4), np.float32), "logit_scale": np.zeros((), np.float32)}
  got, report = models.load_torch_weights("clip_vit_tiny", {**oc, **text}, strict=False)
  assert report["layout"] == "open_clip" and not report["unused"] and not report["missing"]
  assert sorted(report["dropped"]) == sorted(text)
  jax.tree.map(np.testing.assert_array_equal, got, models.load_torch_weights("clip_vit_tiny", sd))


def test_convnext_lowering_per_platform():
  """CPU: the 7x7 depthwise and the patchify convolutions are multiply-adds
  and matmuls (no convolution op); GPU: XLA's own, depthwise grouped."""
  model = models.get("convnext_test", embed_dim=8)
  images = jnp.zeros((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  fn = lambda v, x: model.apply(v, x)[0]
  assert convolutions(lowered(fn, variables, images, platform="cpu")) == []
  convs = convolutions(lowered(fn, variables, images, platform="cuda"))
  assert sorted(g for k, g, _ in convs if k[:2] == (7, 7)) == [8, 16, 24, 32]
  assert {k for k, g, _ in convs if g == 1} == {(4, 4, 3, 8), (2, 2, 8, 16), (2, 2, 16, 24),
                                                 (2, 2, 24, 32)}


@pytest.mark.parametrize("name", ["dinov2_vit_tiny_reg4", "clip_vit_tiny", "convnext_test"])
def test_one_train_step(name):
  """The trainer's jitted step (encoder_bench's triplet loss, AdamW) runs
  with each family and moves its own parameters (LayerScale, projection)."""
  config = config_lib.load_config("configs/encoder_bench.py", "smoke=True")
  # One device: the sharded step is test_train's; an 8-way one compiles twice as long.
  config.mesh.data = 1
  vit = not name.startswith("convnext")
  config.model.update(name=name, pooling="cls" if vit else "avg",
                      embed_dim=None if vit else 16)
  parts = build.build(config)
  state = parts.create_state()
  before = jax.device_get(state["params"])
  batch = sharding.global_batch(
      bench.random_batch(config, int(config.batch_size), np.random.default_rng(0)), parts.mesh)
  state, metrics = train.make_train_step(parts)(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  after = jax.device_get(state["params"])
  own = {"dinov2_vit_tiny_reg4": ("blocks_1", "ls2", "gamma"),
         "clip_vit_tiny": ("head", "kernel"), "convnext_test": ("stages_3", "blocks_0", "gamma")}
  path = own[name]
  moved = lambda tree: functools.reduce(lambda t, k: t[k], path, tree)
  assert not np.allclose(moved(after), moved(before))



@pytest.mark.parametrize("label", TINY)
def test_bfloat16_embeddings_are_close_to_float32(label):
  """The same float32 weights with bf16 compute (LayerScale, QuickGELU,
  registers, depthwise bias included): float32 embeddings out, cosine to
  the float32 run >= 0.995 (test_models' bound)."""
  name = SPECS[label][0]
  variables = models.load_torch_weights(name, _random_state_dict(label), strict=False,
                                        head_norm="l2")[0]
  images = _images(32)
  # The float32 program is test_timm_state_dict_loads_key_for_key's (cached).
  f32 = _jit_apply(name, head_norm="l2")[1](variables, images)[0]
  bf16 = _jit_apply(name, head_norm="l2", dtype="bfloat16")[1](variables, images)[0]
  assert bf16.dtype == jnp.float32
  assert np.sum(np.asarray(f32) * np.asarray(bf16), -1).min() >= 0.995


def test_bad_options_raise():
  images = jnp.zeros((1, 32, 32, 3))
  for name, kwargs, message in [("clip_vit_tiny", dict(act="relu"), "act='relu' is unknown"),
                                ("dinov2_vit_tiny", dict(reg_tokens=-1), "reg_tokens=-1"),
                                ("convnext_test", dict(pooling="cls"), "pooling='cls'"),
                                ("convnext_test", dict(depths=(1, 1)), "one entry per stage")]:
    model = models.get(name, **kwargs)
    with pytest.raises(ValueError, match=message):
      jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  with pytest.raises(ValueError, match="prefix tokens"):
    models.load_torch_weights("dinov2_vit_tiny_reg4", dict(
        _random_state_dict("dinov2_vit_tiny_reg4"), pos_embed=np.zeros((1, 65, 32), np.float32)))

# ---- opt-in: logits against timm and open_clip themselves ----
def _randomize(model, seed=0):
  """Random weights at unit activation scale; LayerScale gammas in [0.3, 1]
  (not timm's 1e-5/1e-6 init) so every block moves the output."""
  g = torch.Generator().manual_seed(seed)
  tokens = ("cls_token", "reg_token", "pos_embed", "class_embedding", "positional_embedding")
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 0:
        continue
      if leaf in tokens:
        p.normal_(0.0, 1.0, generator=g)
      elif leaf == "gamma":
        p.uniform_(0.3, 1.0, generator=g)
      elif leaf == "bias":
        p.normal_(0.0, 0.2, generator=g)
      elif p.ndim == 1:  # LayerNorm weights
        p.uniform_(0.5, 1.5, generator=g)
      else:
        p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
  return model.eval()


def _torch_forward(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_close(got, want, rel=2e-5):
  """Within `rel` of the output's scale (float32 on both sides, a few dozen layers)."""
  want = np.asarray(want)
  assert np.abs(want).std() > 0.1  # not two near-constant outputs
  np.testing.assert_allclose(got, want, atol=rel * np.abs(want).max(), rtol=0)


@pytest.mark.slow
def test_timm_table_is_current():
  pytest.importorskip("timm")
  assert timm_table() == TIMM_TABLE


@pytest.mark.slow
@pytest.mark.parametrize("label,size", [
    ("dinov2_vit_tiny", 32), ("dinov2_vit_tiny_reg4", 32), ("clip_vit_tiny/proj", 32),
    ("convnext_test", 64), ("clip_vit_b16_quickgelu/proj", 224), ("clip_vit_b32/proj", 224),
    ("convnext_tiny", 224)])
def test_logits_match_timm(label, size):
  """timm's model on random weights and ours from its state dict: the same
  logits (CLIP: the projected image features, our embedding with
  head_norm="none"), and for ConvNeXt the same pre-logits features."""
  ref = _randomize(_timm_model(label))
  images = _images(size)
  name, kwargs, _, _ = SPECS[label]
  kwargs = dict(kwargs or dict(head_norm="none"))
  variables = models.load_torch_weights(name, _state_dict(ref), **kwargs)
  out, inter = _jit_apply(name, **kwargs)[1](variables, images)
  _assert_close(out, _torch_forward(ref, images))
  if name.startswith("convnext"):
    with torch.no_grad():
      x = torch.from_numpy(images.transpose(0, 3, 1, 2))
      _assert_close(inter["features"], ref.forward_head(ref.forward_features(x), pre_logits=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dinov2_vit_s14", "dinov2_vit_s14_reg4"])
def test_dinov2_518_checkpoint_at_224_matches_timm(name):
  """DINOv2's checkpoints are made at 518 px (37x37 patches): timm resizes
  their pos_embed when the model is built at 224; ours on load. Same logits."""
  timm = pytest.importorskip("timm")
  sd = _state_dict(_randomize(_timm_model(name, img_size=518)))
  ref = _timm_model(name).eval()
  ref.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(
      {k: torch.from_numpy(v) for k, v in sd.items()}, ref))
  variables, report = models.load_torch_weights(name, sd, strict=False, num_classes=1000)
  assert report["resampled"] == ["pos_embed"] and not report["unused"] and not report["missing"]
  images = _images(224)
  out, _ = _jit_apply(name, num_classes=1000)[1](variables, images)
  _assert_close(out, _torch_forward(ref, images))


@pytest.mark.slow
def test_clip_matches_open_clip_visual_tower():
  """open_clip's whole CLIP (OpenAI's QuickGELU ViT-B/32) on random weights:
  our image tower from its state dict (text tower dropped) gives its
  `encode_image` features."""
  open_clip = pytest.importorskip("open_clip")
  ref = _randomize(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None))
  variables, report = models.load_torch_weights("clip_vit_b32_quickgelu", _state_dict(ref),
                                                strict=False, head_norm="none")
  assert report["layout"] == "open_clip" and not report["unused"] and not report["missing"]
  assert report["dropped"] and not any(k.startswith("visual.") for k in report["dropped"])
  images = _images(224)
  out, _ = _jit_apply("clip_vit_b32_quickgelu", head_norm="none")[1](variables, images)
  with torch.no_grad():
    want = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  _assert_close(out, want)
