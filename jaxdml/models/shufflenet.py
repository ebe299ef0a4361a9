"""ShuffleNetV2 (torchvision layout), the small student of the SBIR distillation.

Module names follow torchvision's `nn.Sequential` indices
(`stage2_0/branch2_3/kernel` <-> `stage2.0.branch2.3.weight`); the ReLUs take
indices too, which is why some numbers are skipped.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdml.models import heads
from jaxdml.models.layers import BatchNorm, Conv, max_pool_3x3_s2


def channel_shuffle(x, groups: int = 2):
  """torchvision's channel_shuffle on NHWC: channel g*(C/groups)+j moves to j*groups+g."""
  b, h, w, c = x.shape
  return x.reshape(b, h, w, groups, c // groups).swapaxes(-1, -2).reshape(b, h, w, c)


class InvertedResidual(nn.Module):
  """torchvision InvertedResidual: split (stride 1) or two strided branches, concat, shuffle."""
  out: int
  strides: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    bf = self.out // 2
    bn = functools.partial(BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    s = self.strides
    if s == 1 and x.shape[-1] != 2 * bf:
      raise ValueError(f"stride-1 block needs {2 * bf} input channels, got {x.shape[-1]}.")

    def branch2(y):
      y = nn.relu(bn(name="branch2_1")(conv(bf, 1, name="branch2_0")(y), train))
      y = bn(name="branch2_4")(conv(bf, 3, s, 1, groups=bf, name="branch2_3")(y), train)
      return nn.relu(bn(name="branch2_6")(conv(bf, 1, name="branch2_5")(y), train))

    if s == 1:
      x1, x2 = jnp.split(x.astype(self.dtype), 2, axis=-1)
      out = jnp.concatenate([x1, branch2(x2)], axis=-1)
    else:
      cin = x.shape[-1]
      y = bn(name="branch1_1")(conv(cin, 3, s, 1, groups=cin, name="branch1_0")(x), train)
      y = nn.relu(bn(name="branch1_3")(conv(bf, 1, name="branch1_2")(y), train))
      out = jnp.concatenate([y, branch2(x)], axis=-1)
    return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 encoder; `__call__(images NHWC, train) -> (output, {"features": pooled})`.

  `stage_out_channels` = (conv1, stage2, stage3, stage4, conv5) widths as in
  torchvision. `image_size` only sets the input size used to initialise.
  """
  stage_repeats: Sequence[int] = (4, 8, 4)
  stage_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)
  num_classes: int | None = None
  embed_dim: int | None = None
  pooling: str = "avg"
  head_norm: str = "l2"
  dtype: Any = jnp.float32
  frozen_bn: bool = False
  remat: bool = False
  image_size: int = 224

  @nn.compact
  def __call__(self, images, train: bool = False):
    heads.check_head_options(pooling=self.pooling, head_norm=self.head_norm,
                             num_classes=self.num_classes, embed_dim=self.embed_dim,
                             allowed_pooling=("avg", *heads.GEM_POOLINGS, "avgmax"))
    bn = functools.partial(BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
    block_cls = InvertedResidual
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    ch = self.stage_out_channels
    x = Conv(ch[0], 3, 2, 1, dtype=self.dtype, name="conv1_0")(images)
    x = nn.relu(bn(name="conv1_1")(x, train))
    x = max_pool_3x3_s2(x)
    for i, (n, c) in enumerate(zip(self.stage_repeats, ch[1:4])):
      for j in range(n):
        x = block_cls(c, 2 if j == 0 else 1, self.frozen_bn, self.dtype,
                      name=f"stage{i + 2}_{j}")(x, train)
    x = Conv(ch[4], 1, dtype=self.dtype, name="conv5_0")(x)
    x = nn.relu(bn(name="conv5_1")(x, train))
    b, h, w, c = x.shape
    return heads.encoder_output(
        x.reshape(b, h * w, c), num_classes=self.num_classes, classifier_name="fc",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        train=train)


VARIANTS = {
    "shufflenet_v2_x0_5": dict(stage_out_channels=(24, 48, 96, 192, 1024)),
    "shufflenet_v2_x1_0": dict(stage_out_channels=(24, 116, 232, 464, 1024)),
    "shufflenet_v2_x1_5": dict(stage_out_channels=(24, 176, 352, 704, 1024)),
    "shufflenet_v2_x2_0": dict(stage_out_channels=(24, 244, 488, 976, 2048)),
    # Compiles in seconds: for tests only.
    "shufflenet_v2_tiny": dict(stage_repeats=(1, 1, 1), stage_out_channels=(8, 16, 32, 64, 128),
                               image_size=32),
}


def make(variant: str, **kwargs) -> ShuffleNetV2:
  """ShuffleNetV2 `variant` (a key of VARIANTS) with model kwargs overriding its defaults."""
  return ShuffleNetV2(**{**VARIANTS[variant], **kwargs})
