"""ConvNeXt in timm's layout (ConvNeXt-T/S/B, `timm.models.convnext`).

Patchify stem (4x4 stride-4 convolution, LayerNorm), four stages of blocks
(7x7 depthwise convolution -> LayerNorm -> Linear 4x -> exact GELU -> Linear
-> LayerScale `gamma`, plus the input), a LayerNorm + 2x2 stride-2
convolution between stages, then average pooling -> LayerNorm -> classifier
(timm's `head.norm`, `head.fc`). Every LayerNorm has eps 1e-6 and
normalises the channels (timm's LayerNorm2d is the same on NHWC).
Convolutions are `layers.Conv`: on CPU the depthwise 7x7 runs as shifted
multiply-adds and the patchify convolutions as matmuls, on GPU/TPU as XLA's
convolutions. Names map to timm keys (`stages_2/blocks_5/conv_dw/kernel` <->
`stages.2.blocks.5.conv_dw.weight`, `torch_import.py`).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdml.models import heads
from jaxdml.data.augment import MEAN, STD
from jaxdml.models.layers import Conv, to_image_stats
from jaxdml.models.vit import Mlp

_LN_EPS = 1e-6
_dense_init = nn.initializers.truncated_normal(0.02)


class ConvNeXtBlock(nn.Module):
  """timm ConvNeXtBlock (conv_mlp=False): x + gamma * mlp(norm(conv_dw(x)))."""
  layer_scale: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = Conv(c, 7, 1, 3, groups=c, use_bias=True, dtype=self.dtype, name="conv_dw")(x)
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(y)
    y = Mlp(4 * c, self.dtype, name="mlp")(y)
    gamma = self.param("gamma", nn.initializers.constant(self.layer_scale), (c,), jnp.float32)
    return x.astype(self.dtype) + y * gamma.astype(self.dtype)


class ConvNeXtStage(nn.Module):
  """timm ConvNeXtStage: `downsample` (LayerNorm, 2x2 stride-2 conv) unless first, then blocks."""
  width: int
  depth: int
  downsample: bool
  layer_scale: float = 1e-6
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="downsample_0")(x)
      x = Conv(self.width, 2, 2, use_bias=True, dtype=self.dtype, name="downsample_1")(x)
    block_cls = nn.remat(ConvNeXtBlock) if self.remat else ConvNeXtBlock
    for j in range(self.depth):
      x = block_cls(self.layer_scale, self.dtype, name=f"blocks_{j}")(x)
    return x


class _NormHead(nn.Module):
  """timm NormMlpClassifierHead without its optional MLP: `norm` of pooled features, `fc`."""
  num_classes: int | None = None

  def setup(self):
    # Float32 like every embedding head: it normalises the pooled features.
    self.norm = nn.LayerNorm(epsilon=_LN_EPS, dtype=jnp.float32)
    if self.num_classes is not None:
      self.fc = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=_dense_init)

  def __call__(self, pooled):
    return self.fc(pooled)


class ConvNeXt(nn.Module):
  """ConvNeXt encoder; `__call__(images NHWC, train) -> (output, {"features": pooled})`.

  Pooling "avg" (timm's) or "gem", "gem_l2", "avgmax"; whichever it is, the
  pooled features then go through timm's `head.norm` (as timm's head does
  after any `global_pool`) before the classifier `head.fc` or the embedding
  head. `image_size` only sets the input size used to initialise (no
  parameter depends on it). `remat=True` recomputes each block in the
  backward pass. `frozen_bn` is accepted for a uniform interface (no
  BatchNorm here outside a "bn" head). No stochastic depth: the recipes here
  do not use it. `image_mean`/`image_std`: the weights' input statistics
  (default ImageNet's; `layers.to_image_stats`).
  """
  depths: Sequence[int] = (3, 3, 9, 3)
  widths: Sequence[int] = (96, 192, 384, 768)
  layer_scale: float = 1e-6
  image_size: int = 224
  num_classes: int | None = None
  embed_dim: int | None = None
  pooling: str = "avg"
  head_norm: str = "l2"
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  remat: bool = False
  image_mean: tuple = MEAN
  image_std: tuple = STD

  @nn.compact
  def __call__(self, images, train: bool = False):
    heads.check_head_options(pooling=self.pooling, head_norm=self.head_norm,
                             num_classes=self.num_classes, embed_dim=self.embed_dim,
                             allowed_pooling=("avg", *heads.GEM_POOLINGS, "avgmax"))
    images = to_image_stats(images, self.image_mean, self.image_std)
    if len(self.depths) != len(self.widths):
      raise ValueError(f"depths {tuple(self.depths)} and widths {tuple(self.widths)} must "
                       "have one entry per stage.")
    x = Conv(self.widths[0], 4, 4, use_bias=True, dtype=self.dtype, name="stem_0")(images)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="stem_1")(x)
    stage = functools.partial(ConvNeXtStage, layer_scale=self.layer_scale, dtype=self.dtype,
                              remat=self.remat)
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      x = stage(width, depth, i > 0, name=f"stages_{i}")(x)
    b, h, w, c = x.shape
    head = _NormHead(self.num_classes, name="head")
    return heads.encoder_output(
        x.reshape(b, h * w, c), num_classes=self.num_classes, classifier_name="head",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        train=train, pooled_norm=head.norm, classifier=head)


VARIANTS = {
    "convnext_tiny": dict(depths=(3, 3, 9, 3), widths=(96, 192, 384, 768)),
    "convnext_small": dict(depths=(3, 3, 27, 3), widths=(96, 192, 384, 768)),
    "convnext_base": dict(depths=(3, 3, 27, 3), widths=(128, 256, 512, 1024)),
    # Compiles in seconds: for tests only ("convnext_tiny" is timm's 28M model).
    "convnext_test": dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), image_size=32),
}


def make(variant: str, **kwargs) -> ConvNeXt:
  """ConvNeXt `variant` (a key of VARIANTS) with model kwargs overriding its defaults."""
  return ConvNeXt(**{**VARIANTS[variant], **kwargs})
