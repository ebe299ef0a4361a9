"""ResNet v1.5 (torchvision layout: the stride sits on the 3x3 convolution).

Written for a fast CPU train step: 1x1 convolutions are plain matmuls on the
channel axis and BatchNorm uses one-pass statistics with a folded affine
(`heads.BatchNorm`). Module and parameter names map one-to-one to torchvision
state-dict keys (`layer1_0/conv1/kernel` <-> `layer1.0.conv1.weight`), see
`torch_import.py`.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models import heads

# torchvision initialises convolutions with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
  """Bias-free convolution, kernel `[kh, kw, in/groups, out]` (torch `[out, in/groups, kh, kw]`).

  A 1x1 convolution is a strided slice plus one matmul: XLA's CPU convolution
  path is slower than its dot path for these, mostly in the backward pass.
  A depthwise convolution (groups == in == out) is k*k shifted multiply-adds:
  XLA CPU runs `feature_group_count` convolutions 10-20x slower than that,
  forward and backward (ShuffleNet's train step was dominated by them).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, cin = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param("kernel", _conv_init, (k, k, cin // self.groups, self.features),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 1 and self.groups == 1 and self.padding == 0:
      if s > 1:
        x = x[:, ::s, ::s, :]
      return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
    p = self.padding
    if self.groups == cin == self.features and cin > 1:
      return depthwise_conv(x, kernel[:, :, 0], strides=s, padding=p)
    if self.groups == 1 and cin * k * k <= _IM2COL_MAX_DEPTH:
      return _im2col_conv(x, kernel, strides=s, padding=p)
    return jax.lax.conv_general_dilated(
        x, kernel, (s, s), ((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)


# Stems (3 input channels) run as one matmul over k*k*cin patch features: XLA
# CPU's convolution reaches ~5 GFLOP/s there (a ShuffleNet stem took 58 ms).
_IM2COL_MAX_DEPTH = 160


def _shifted(x, i, j, ho, wo, s):
  return x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]


def _im2col_conv(x, kernel, *, strides: int, padding: int):
  kh, kw, cin, out = kernel.shape
  b, h, w, _ = x.shape
  p, s = padding, strides
  x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
  cols = jnp.concatenate([_shifted(x, i, j, ho, wo, s) for i in range(kh) for j in range(kw)], -1)
  return jnp.einsum("bhwk,kd->bhwd", cols, kernel.reshape(kh * kw * cin, out))


def max_pool_3x3_s2(x):
  """NHWC 3x3 max pooling, stride 2, padding 1 (the ResNet/ShuffleNet stem), as `nn.max_pool`.

  Separable (rows, then columns) on a [.., h/2, 2, w/2, 2, ..] view, so every
  slice is contiguous: its backward is a few selects and plain pads, ~3x faster
  on CPU than JAX's select-and-scatter emulation (a reduce-window over
  value/index pairs) or strided slices (pads with interior padding). Ties split
  the gradient evenly where torch picks one; ties come only from equal inputs
  (e.g. zeros after a ReLU, whose gradient the ReLU drops anyway).
  """
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  x = jnp.pad(x, ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0)),
              constant_values=-jnp.inf).reshape(b, ho + 1, 2, wo + 1, 2, c)
  # Padded index 2*o + k for window offset k = 0, 1, 2 is (block o, phase k) or (o + 1, 0).
  r = jnp.maximum(jnp.maximum(x[:, :, :, :wo, 0], x[:, :, :, :wo, 1]), x[:, :, :, 1:, 0])
  return jnp.maximum(jnp.maximum(r[:, :ho, 0], r[:, :ho, 1]), r[:, 1:, 0])


def depthwise_conv(x, kernel, *, strides: int, padding: int):
  """Depthwise NHWC convolution with `kernel [kh, kw, C]` as kh*kw shifted multiply-adds.

  The backward pass is written by hand (`_depthwise_bwd`): autodiff turns
  each of the kh*kw shifted slices into its own zero-padded copy of the
  gradient, where the input gradient is one depthwise correlation of the
  (dilated) output gradient with the flipped kernel. That halved ShuffleNet's
  depthwise backward on CPU (e.g. 28x28x116, batch 16: 187 -> 90 ms).
  """
  if padding > kernel.shape[0] - 1 or padding > kernel.shape[1] - 1:
    raise ValueError(f"depthwise_conv: padding {padding} exceeds kernel size - 1 "
                     f"({kernel.shape[0]}x{kernel.shape[1]} kernel).")
  return _depthwise(x, kernel, strides, padding)


def _depthwise_forward(x, kernel, s: int, p: int):
  kh, kw, _ = kernel.shape
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _shifted(x, i, j, ho, wo, s) * kernel[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, s: int, p: int):
  return _depthwise_forward(x, kernel, s, p)


def _depthwise_fwd(x, kernel, s, p):
  return _depthwise_forward(x, kernel, s, p), (x, kernel)


def _depthwise_bwd(s, p, residuals, dy):
  x, kernel = residuals
  kh, kw, _ = kernel.shape
  _, h, w, _ = x.shape
  ho, wo = dy.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  d_kernel = jnp.stack([
      jnp.stack([jnp.sum(_shifted(padded, i, j, ho, wo, s) * dy, (0, 1, 2), dtype=jnp.float32)
                 for j in range(kw)])
      for i in range(kh)])
  # Input row y received output rows o with s*o + i = y + p: dilate dy by the
  # stride, then pad so that tap i reads row y + kh - 1 - i (negative pads crop).
  lo_h, lo_w = kh - 1 - p, kw - 1 - p
  hi_h = h + kh - 1 - lo_h - (s * (ho - 1) + 1)
  hi_w = w + kw - 1 - lo_w - (s * (wo - 1) + 1)
  dy = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                   ((0, 0, 0), (lo_h, hi_h, s - 1), (lo_w, hi_w, s - 1), (0, 0, 0)))
  dx = None
  for i in range(kh):
    for j in range(kw):
      term = dy[:, kh - 1 - i:kh - 1 - i + h, kw - 1 - j:kw - 1 - j + w] * kernel[i, j]
      dx = term if dx is None else dx + term
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> 3x3, projection shortcut when shapes change."""
  width: int
  strides: int = 1
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(heads.BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
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
    bn = functools.partial(heads.BatchNorm, frozen=self.frozen_bn, dtype=self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.width, 1, name="conv1")(x), train))
    y = nn.relu(bn(name="bn2")(conv(self.width, 3, self.strides, 1, name="conv2")(y), train))
    y = bn(name="bn3")(conv(self.width * 4, 1, name="conv3")(y), train)
    return nn.relu(y + _shortcut(self, x, self.width * 4, train))


def _shortcut(block, x, out, train):
  if x.shape[-1] == out and block.strides == 1:
    return x.astype(block.dtype)
  y = Conv(out, 1, block.strides, dtype=block.dtype, name="downsample_0")(x)
  return heads.BatchNorm(frozen=block.frozen_bn, dtype=block.dtype, name="downsample_1")(y, train)


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
    x = nn.relu(heads.BatchNorm(frozen=self.frozen_bn, dtype=self.dtype, name="bn1")(x, train))
    x = max_pool_3x3_s2(x)
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(w, strides, self.frozen_bn, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    b, h, w_, c = x.shape
    return heads.encoder_output(
        x.reshape(b, h * w_, c), num_classes=self.num_classes, classifier_name="fc",
        pooling=self.pooling, embed_dim=self.embed_dim, head_norm=self.head_norm,
        dtype=self.dtype, train=train)


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
