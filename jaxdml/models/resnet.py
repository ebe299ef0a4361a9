"""ResNet v1.5 (torchvision layout: the stride sits on the 3x3 convolution).

Written for a fast CPU train step: 1x1 convolutions are plain matmuls on the
channel axis and BatchNorm uses one-pass statistics with a folded affine
(`BatchNorm`). Module and parameter names map one-to-one to torchvision
state-dict keys (`layer1_0/conv1/kernel` <-> `layer1.0.conv1.weight`), see
`torch_import.py`.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models import heads
from jaxdml.models.layers import BatchNorm, Conv, max_pool_3x3_s2

class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, projection shortcut when shapes change."""
  width: int
  strides: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.width, 3, self.strides, 1, name="conv1")(x), train))
    y = bn(name="bn2")(conv(self.width, 3, 1, 1, name="conv2")(y), train)
    return nn.relu(y + _shortcut(self, x, self.width, train))


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4)."""
  width: int
  strides: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.width, 1, name="conv1")(x), train))
    y = nn.relu(bn(name="bn2")(conv(self.width, 3, self.strides, 1, name="conv2")(y), train))
    y = bn(name="bn3")(conv(self.width * 4, 1, name="conv3")(y), train)
    return nn.relu(y + _shortcut(self, x, self.width * 4, train))


def _shortcut(block, x, out, train):
  if x.shape[-1] == out and block.strides == 1:
    return x.astype(block.dtype)
  y = Conv(out, 1, block.strides, dtype=block.dtype, name="downsample_0")(x)
  return BatchNorm(frozen=block.frozen_bn, dtype=block.dtype, name="downsample_1")(y, train)


class ResNet(nn.Module):
  """ResNet encoder; `__call__(images NHWC, train) -> (output, {"features": pooled})`.

  `image_size` only sets the input size used to initialise (no parameter
  depends on it). `remat=True` recomputes each residual block in the backward
  pass (less memory, ~30% more compute).
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  num_classes: int | None = None
  embed_dim: int | None = None
  pooling: str = "avg"
  head_norm: str = "l2"
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  remat: bool = False
  image_size: int = 224

  def _check_options(self):
    heads.check_head_options(pooling=self.pooling, head_norm=self.head_norm,
                             num_classes=self.num_classes, embed_dim=self.embed_dim,
                             allowed_pooling=("avg", *heads.GEM_POOLINGS, "avgmax"))
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"block={self.block!r}; use 'basic' or 'bottleneck'.")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self._check_options()
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    x = Conv(self.stem_width, 7, 2, 3, dtype=self.dtype, name="conv1")(images)
    x = nn.relu(BatchNorm(frozen=self.frozen_bn, dtype=self.dtype, name="bn1")(x, train))
    x = max_pool_3x3_s2(x)
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(w, strides, self.frozen_bn, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    b, h, w_, c = x.shape
    return heads.encoder_output(
        x.reshape(b, h * w_, c), num_classes=self.num_classes, classifier_name="fc",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        train=train)


_BASIC, _BOTTLENECK = dict(block="basic"), dict(block="bottleneck")
VARIANTS = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), **_BASIC),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), **_BASIC),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), **_BOTTLENECK),
    "resnet101": dict(stage_sizes=(3, 4, 23, 3), **_BOTTLENECK),
    # Compiles in seconds: for tests only.
    "resnet_tiny": dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8,
                        image_size=32, **_BASIC),
    # Real but small: trains at 64 px on a 2-core CPU in minutes.
    "resnet_small": dict(stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_width=32,
                         image_size=64, **_BASIC),
}


def make(variant: str, **kwargs) -> ResNet:
  """ResNet `variant` (a key of VARIANTS) with model kwargs overriding its defaults."""
  return ResNet(**{**VARIANTS[variant], **kwargs})
