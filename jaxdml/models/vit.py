"""Vision Transformer in timm's layout (ViT-Ti/S/B 16; ViT-S/16 is DeiT-S).

Pre-norm blocks, fused qkv Linear, CLS token, learned position embedding,
LayerNorm eps 1e-6, exact GELU. Attention is `jax.nn.dot_product_attention`:
cuDNN's fused kernel on GPU where it applies, XLA's elsewhere (`attention`).
Names map to timm keys (`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`).

The position embedding is stored for `image_size`; at another input size it is
resampled bicubically on the fly (as `resample_pos_embed`), so a model trained
at 224 runs at 448 with the same variables (the RAML teacher).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models import heads

_dense_init = nn.initializers.truncated_normal(0.02)


def resample_pos_embed(pos_embed, grid: tuple[int, int]):
  """`[1, 1 + h*w, D]` position embedding (CLS first) resized to `grid` patches.

  Bicubic with antialiasing (jax.image.resize), which matches timm's
  `resample_abs_pos_embed` (torch bicubic, antialias=True, a=-0.5).
  """
  n = pos_embed.shape[1] - 1
  old = int(round(n ** 0.5))
  if old * old != n:
    raise ValueError(f"pos_embed with {n} patch positions is not a square grid.")
  if (old, old) == tuple(grid):
    return pos_embed
  d = pos_embed.shape[-1]
  patches = pos_embed[0, 1:].reshape(old, old, d).astype(jnp.float32)
  patches = jax.image.resize(patches, (*grid, d), method="bicubic", antialias=True)
  return jnp.concatenate([pos_embed[:, :1], patches.reshape(1, -1, d).astype(pos_embed.dtype)], 1)


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


class Mlp(nn.Module):
  """timm Mlp: fc1 -> exact GELU -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_dense_init)
    y = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=False)
    return dense(x.shape[-1], name="fc2")(y)


class Block(nn.Module):
  """timm pre-norm Block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ln = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    x = x + Attention(self.num_heads, self.dtype, name="attn")(ln(name="norm1")(x))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, self.dtype, name="mlp")(ln(name="norm2")(x))


class ViT(nn.Module):
  """ViT encoder; `__call__(images NHWC, train) -> (output, {"features": pooled})`.

  Pooling "cls" (default) takes the CLS token after the final norm; "avg",
  "gem" and "avgmax" pool the patch tokens after the final norm (timm's
  avg-pooled models use a separate fc_norm instead; we keep one layout).
  `frozen_bn` is accepted for a uniform interface (a ViT has no BatchNorm
  outside a "bn" head). No dropout: the recipes here do not use it.
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

  @nn.compact
  def __call__(self, images, train: bool = False):
    heads.check_head_options(pooling=self.pooling, head_norm=self.head_norm,
                             num_classes=self.num_classes, embed_dim=self.embed_dim,
                             allowed_pooling=heads.POOLINGS)
    p, d = self.patch_size, self.hidden_size
    b, h, w, c = images.shape
    gh, gw = h // p, w // p
    if gh == 0 or gw == 0:
      raise ValueError(f"images {h}x{w} are smaller than one {p}x{p} patch.")
    # Patch embedding as reshape + matmul (a stride-p conv); torch drops the remainder too.
    x = images[:, :gh * p, :gw * p].astype(self.dtype)
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    x = _PatchEmbed(d, p, self.dtype, name="patch_embed")(x, c)
    g = self.image_size // p
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
    pos = self.param("pos_embed", _dense_init, (1, 1 + g * g, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    x = x + resample_pos_embed(pos, (gh, gw)).astype(self.dtype)
    block_cls = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return heads.encoder_output(
        x[:, 1:], cls=x[:, 0], num_classes=self.num_classes, classifier_name="head",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        train=train)


class _PatchEmbed(nn.Module):
  """Holds `proj` (timm `patch_embed.proj`), a conv kernel `[p, p, c, D]` applied as a matmul."""
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, channels: int):
    p = self.patch_size
    shape = (p, p, channels, self.features)
    return _Proj(shape, self.dtype, name="proj")(x)


class _Proj(nn.Module):
  """Patch projection: a `[p, p, c, D]` conv kernel (timm layout after transpose) as a matmul."""
  shape: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.shape[-1],), jnp.float32)
    k = kernel.reshape(-1, self.shape[-1]).astype(self.dtype)
    return x @ k + bias.astype(self.dtype)


VARIANTS = {
    "vit_ti16": dict(hidden_size=192, depth=12, num_heads=3),
    "vit_s16": dict(hidden_size=384, depth=12, num_heads=6),
    "vit_b16": dict(hidden_size=768, depth=12, num_heads=12),
    # Compiles in seconds: for tests only.
    "vit_tiny": dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, image_size=32),
    # Real but small: trains at 64 px on a 2-core CPU in minutes.
    "vit_small_demo": dict(patch_size=8, hidden_size=192, depth=4, num_heads=3, image_size=64),
}


def make(variant: str, **kwargs) -> ViT:
  """ViT `variant` (a key of VARIANTS) with model kwargs overriding its defaults."""
  return ViT(**{**VARIANTS[variant], **kwargs})
