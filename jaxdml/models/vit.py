"""Vision Transformer in timm's layout: ViT/DeiT, DINOv2 (registers too) and CLIP's image tower.

Pre-norm blocks, fused qkv Linear, CLS token, learned position embedding,
LayerNorm (eps 1e-6; CLIP 1e-5), exact GELU (OpenAI CLIP: QuickGELU).
Options beyond the plain ViT, each one of timm's `VisionTransformer`
arguments: LayerScale on both residual branches (`layer_scale` = timm's
`init_values`, DINOv2), register tokens after the CLS token (`reg_tokens`),
a position embedding for the patches only (`no_embed_class`, DINOv2 with
registers), a LayerNorm before the blocks and a bias-free patch embedding
(`pre_norm`, CLIP) and CLIP's image projection (`proj_dim`, timm's `head`).
Attention is `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU
where it applies, XLA's elsewhere (`attention`). Names map to timm keys
(`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`).

The position embedding is stored for `image_size`; at another input size it is
resampled bicubically on the fly (`pos_embed.resample_pos_embed`, antialiased
as timm's dynamic image size), so a model trained at 224 runs at 448 with the
same variables (the RAML teacher).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models import heads
from jaxdml.data.augment import MEAN, STD
from jaxdml.models.layers import at_least_float32, to_image_stats
from jaxdml.models.pos_embed import resample_pos_embed

_dense_init = nn.initializers.truncated_normal(0.02)


def attention(q, k, v):
  """softmax(q k^T / sqrt(d_head)) v over `[B, T, heads, d_head]`.

  The GPU lowering uses cuDNN's fused (flash) attention, which never writes
  the [B, heads, T, T] logits, when JAX can trace it here: a bf16/fp16 input,
  a head width cuDNN takes, and a process that sees cuDNN (its version and
  the GPU's compute capability pick the kernel at trace time, so a CPU-only
  host lowers the cuda branch with XLA's attention). Everything else, and
  every other platform, runs XLA's attention.
  """
  xla = functools.partial(jax.nn.dot_product_attention, implementation="xla")
  if not _cudnn_attention_traces(q.shape, k.shape, jnp.dtype(q.dtype)):
    return xla(q, k, v)
  cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
  return jax.lax.platform_dependent(q, k, v, cuda=cudnn, default=xla)


@functools.lru_cache(maxsize=None)
def _cudnn_attention_traces(q_shape, kv_shape, dtype) -> bool:
  """Whether cuDNN attention traces for these shapes, forward and backward."""
  if dtype not in (jnp.bfloat16, jnp.float16):
    return False
  q, kv = jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(kv_shape, dtype)

  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))

  try:
    jax.eval_shape(jax.grad(loss, (0, 1, 2)), q, kv, kv)
  except (RuntimeError, NotImplementedError, ValueError):
    return False
  return True


class Attention(nn.Module):
  """timm Attention: fused qkv Linear, softmax(q k^T / sqrt(d_head)) v, output proj."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_dense_init, name="qkv")(x)
    # timm lays the 3*d outputs out as [3, heads, head_dim].
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init, name="proj")(y.reshape(b, t, d))


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (timm's `quick_gelu`)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=False), "quick_gelu": quick_gelu}


class Mlp(nn.Module):
  """timm Mlp: fc1 -> activation (exact GELU, or QuickGELU) -> fc2."""
  hidden: int
  dtype: Any = jnp.float32
  act: str = "gelu"

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_dense_init)
    y = ACTIVATIONS[self.act](dense(self.hidden, name="fc1")(x))
    return dense(x.shape[-1], name="fc2")(y)


class LayerScale(nn.Module):
  """timm LayerScale: a learned per-channel `gamma`, initialised to `init_value`."""
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """timm pre-norm Block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

  `layer_scale` None: no LayerScale (ls1/ls2 are the identity, as in timm).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  layer_scale: float | None = None
  act: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    ln = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, dtype=self.dtype)

    def scaled(y, name):
      return y if self.layer_scale is None else LayerScale(self.layer_scale, name=name)(y)
    x = x + scaled(Attention(self.num_heads, self.dtype, name="attn")(ln(name="norm1")(x)), "ls1")
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = Mlp(hidden, self.dtype, self.act, name="mlp")(ln(name="norm2")(x))
    return x + scaled(y, "ls2")


class ViT(nn.Module):
  """ViT encoder; `__call__(images NHWC, train) -> (output, {"features": pooled})`.

  Pooling "cls" (default) takes the CLS token after the final norm; "avg",
  "gem" and "avgmax" pool the patch tokens (never CLS or registers) after the
  final norm (timm's avg-pooled models use a separate fc_norm instead; we
  keep one layout). `proj_dim` (CLIP) projects the final tokens with a
  Linear named `head` before the embedding head, so the pretrained
  projection loads with the tower; with `num_classes` the `head` is the
  classifier instead (timm: `num_classes` replaces the projection, and
  `num_classes=proj_dim` is timm's CLIP image features). `frozen_bn` is
  accepted for a uniform interface (a ViT has no BatchNorm outside a "bn"
  head). No dropout: the recipes here do not use it. `image_mean` and
  `image_std` are the per-channel statistics the weights were trained with
  (default ImageNet's, what the input pipeline normalises with; CLIP's
  differ, `layers.to_image_stats`).
  """
  patch_size: int = 16
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  image_size: int = 224
  num_classes: int | None = None
  embed_dim: int | None = None
  pooling: str = "cls"
  head_norm: str = "l2"
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  remat: bool = False
  layer_scale: float | None = None
  reg_tokens: int = 0
  no_embed_class: bool = False
  pre_norm: bool = False
  act: str = "gelu"
  norm_eps: float = 1e-6
  proj_dim: int | None = None
  image_mean: tuple = MEAN
  image_std: tuple = STD

  @property
  def num_pos_prefix_tokens(self) -> int:
    """Rows of `pos_embed` before the patch grid: CLS and registers, or none (`no_embed_class`)."""
    return 0 if self.no_embed_class else 1 + self.reg_tokens

  def _check_options(self):
    heads.check_head_options(pooling=self.pooling, head_norm=self.head_norm,
                             num_classes=self.num_classes, embed_dim=self.embed_dim,
                             allowed_pooling=heads.POOLINGS)
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act={self.act!r} is unknown; use one of {tuple(ACTIVATIONS)} "
                       "('quick_gelu' for OpenAI's CLIP weights).")
    if self.reg_tokens < 0 or (self.proj_dim is not None and self.proj_dim < 1):
      raise ValueError(f"reg_tokens={self.reg_tokens} and proj_dim={self.proj_dim} must be "
                       ">= 0 and >= 1 (or None).")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self._check_options()
    p, d = self.patch_size, self.hidden_size
    images = to_image_stats(images, self.image_mean, self.image_std)
    b, h, w, c = images.shape
    gh, gw = h // p, w // p
    if gh == 0 or gw == 0:
      raise ValueError(f"images {h}x{w} are smaller than one {p}x{p} patch.")
    # Patch embedding as reshape + matmul (a stride-p conv); torch drops the remainder too.
    x = images[:, :gh * p, :gw * p].astype(self.dtype)
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    # timm's pre-norm (CLIP) patch embedding has no bias: norm_pre follows it.
    x = _PatchEmbed(d, p, not self.pre_norm, self.dtype, name="patch_embed")(x, c)
    token_init = nn.initializers.normal(1e-6)
    prefix = [self.param("cls_token", token_init, (1, 1, d), jnp.float32)]
    if self.reg_tokens:
      prefix.append(self.param("reg_token", token_init, (1, self.reg_tokens, d), jnp.float32))
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (b, *t.shape[1:])) for t in prefix]
    g, n_pos = self.image_size // p, self.num_pos_prefix_tokens
    pos = self.param("pos_embed", _dense_init, (1, n_pos + g * g, d), jnp.float32)
    pos = resample_pos_embed(pos, (gh, gw), num_prefix_tokens=n_pos).astype(self.dtype)
    if self.no_embed_class:
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    ln = functools.partial(nn.LayerNorm, epsilon=self.norm_eps, dtype=self.dtype)
    if self.pre_norm:
      x = ln(name="norm_pre")(x)
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, self.dtype, self.layer_scale, self.act,
                    self.norm_eps, name=f"blocks_{i}")(x)
    x = ln(name="norm")(x)
    local, cls = x[:, 1 + self.reg_tokens:], x[:, 0]
    if self.proj_dim is not None and self.num_classes is None:
      # float32 like the embedding head it feeds; unused tokens' projection is dead code to XLA.
      local, cls = at_least_float32(local), at_least_float32(cls)
      proj = nn.Dense(self.proj_dim, dtype=local.dtype, kernel_init=_dense_init, name="head")
      local, cls = proj(local), proj(cls)
    return heads.encoder_output(
        local, cls=cls, num_classes=self.num_classes, classifier_name="head",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        train=train)


class _PatchEmbed(nn.Module):
  """Holds `proj` (timm `patch_embed.proj`), a conv kernel `[p, p, c, D]` applied as a matmul."""
  features: int
  patch_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, channels: int):
    p = self.patch_size
    shape = (p, p, channels, self.features)
    return _Proj(shape, self.use_bias, self.dtype, name="proj")(x)


class _Proj(nn.Module):
  """Patch projection: a `[p, p, c, D]` conv kernel (timm layout after transpose) as a matmul."""
  shape: tuple
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)
    y = x @ kernel.reshape(-1, self.shape[-1]).astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.shape[-1],),
                         jnp.float32).astype(self.dtype)
    return y


_TINY = dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, image_size=32)
_S, _B = dict(hidden_size=384, depth=12, num_heads=6), dict(hidden_size=768, depth=12, num_heads=12)
_L = dict(hidden_size=1024, depth=24, num_heads=16)
# timm's vit_*_patch14_dinov2 (init_values=1e-5) and vit_*_patch14_reg4_dinov2.
_DINOV2 = dict(patch_size=14, layer_scale=1e-5)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
# timm's vit_*_clip_224: pre_norm, LayerNorm eps 1e-5, the projection as `head`.
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_QUICK = dict(act="quick_gelu")

VARIANTS = {
    "vit_ti16": dict(hidden_size=192, depth=12, num_heads=3),
    "vit_s16": _S,
    "vit_b16": _B,
    "dinov2_vit_s14": {**_DINOV2, **_S},
    "dinov2_vit_b14": {**_DINOV2, **_B},
    "dinov2_vit_l14": {**_DINOV2, **_L},
    "dinov2_vit_s14_reg4": {**_DINOV2, **_S, **_REG4},
    "dinov2_vit_b14_reg4": {**_DINOV2, **_B, **_REG4},
    "dinov2_vit_l14_reg4": {**_DINOV2, **_L, **_REG4},
    "clip_vit_b16": {**_CLIP, **_B, "patch_size": 16, "proj_dim": 512},
    "clip_vit_b32": {**_CLIP, **_B, "patch_size": 32, "proj_dim": 512},
    "clip_vit_l14": {**_CLIP, **_L, "patch_size": 14, "proj_dim": 768},
    # OpenAI's CLIP weights were trained with QuickGELU (timm's *_clip_quickgelu_224).
    "clip_vit_b16_quickgelu": {**_CLIP, **_B, "patch_size": 16, "proj_dim": 512, **_QUICK},
    "clip_vit_b32_quickgelu": {**_CLIP, **_B, "patch_size": 32, "proj_dim": 512, **_QUICK},
    "clip_vit_l14_quickgelu": {**_CLIP, **_L, "patch_size": 14, "proj_dim": 768, **_QUICK},
    # Compile in seconds: for tests only.
    "vit_tiny": _TINY,
    "dinov2_vit_tiny": {**_TINY, "layer_scale": 1e-5},
    "dinov2_vit_tiny_reg4": {**_TINY, "layer_scale": 1e-5, **_REG4},
    "clip_vit_tiny": {**_TINY, **_CLIP, "proj_dim": 16, **_QUICK},
    # Real but small: trains at 64 px on a 2-core CPU in minutes.
    "vit_small_demo": dict(patch_size=8, hidden_size=192, depth=4, num_heads=3, image_size=64),
}


def make(variant: str, **kwargs) -> ViT:
  """ViT `variant` (a key of VARIANTS) with model kwargs overriding its defaults."""
  return ViT(**{**VARIANTS[variant], **kwargs})
