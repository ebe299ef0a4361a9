"""Layers the encoders share: convolution, depthwise convolution, max pooling, BatchNorm.

Each has torch's semantics, so torchvision weights load one-to-one. Where
XLA's CPU kernels are slow, the CPU gets a rewrite (why, per layer, in its
docstring) and GPU/TPU keep XLA's own convolution and reduce-window, which
cuDNN and the TPU MXU run best. The choice is made per platform when the
program is lowered (`jax.lax.platform_dependent`), not when it is traced:
one export lowered for cpu, cuda and tpu at once carries each platform's
kernels, whatever host made it.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal(fan_out, relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def on_cpu_else(cpu_fn, accelerator_fn, *args):
  """`cpu_fn(*args)` in the CPU lowering, `accelerator_fn(*args)` in the GPU and TPU ones.

  Both are traced; each platform's lowering keeps only its own branch (a
  one-branch `case` XLA removes), so neither costs anything elsewhere.
  """
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=accelerator_fn)


def to_image_stats(images, mean, std):
  """ImageNet-normalised images (what `jaxdml.data.normalize` hands every
  encoder) renormalised to another mean/std per channel: `(x * 255 - mean *
  255) / (std * 255)` of the same uint8 pixels, for weights trained with
  other statistics (CLIP's). ImageNet's own statistics return `images`
  untouched, bit for bit."""
  from jaxdml.data.augment import MEAN, STD  # pylint: disable=g-import-not-at-top
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"image_mean={mean} and image_std={std} must be 3 per-channel values "
                     "(RGB, in [0, 1] units), std > 0.")
  if (mean, std) == (MEAN, STD):
    return images
  scale = jnp.asarray(STD, jnp.float32) / jnp.asarray(std, jnp.float32)
  shift = (jnp.asarray(MEAN, jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)
  return images * scale + shift


def at_least_float32(x):
  """`x` in float32, or in its own dtype where that is wider (float64 checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Conv(nn.Module):
  """Convolution, kernel `[kh, kw, in/groups, out]` (torch `[out, in/groups, kh, kw]`).

  Bias-free unless `use_bias` (timm's ConvNeXt convolutions have one). A
  1x1 convolution is a strided slice plus one matmul on every platform (XLA
  turns it into the same dot on GPU/TPU; on CPU its convolution path is
  slower, mostly in the backward pass). On CPU only: a depthwise convolution
  (groups == in == out) is k*k shifted multiply-adds, as XLA CPU runs
  `feature_group_count` convolutions 10-20x slower than that, forward and
  backward; a stem (k*k*in <= 160) is one im2col matmul; a patchify
  convolution (stride == kernel, no padding: ConvNeXt's stem and
  downsampling) is a reshape and one matmul. GPU and TPU run
  `lax.conv_general_dilated` (grouped for depthwise) for all of them.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  groups: int = 1
  dtype: Any = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    y = self._convolve(x)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y

  def _convolve(self, x):
    k, s, cin = self.kernel_size, self.strides, x.shape[-1]
    kernel = self.param("kernel", _conv_init, (k, k, cin // self.groups, self.features),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 1 and self.groups == 1 and self.padding == 0:
      if s > 1:
        x = x[:, ::s, ::s, :]
      return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
    p, groups = self.padding, self.groups
    xla_conv = functools.partial(_xla_conv, strides=s, padding=p, groups=groups)
    if groups == cin == self.features and cin > 1:
      cpu_conv = lambda x, w: depthwise_conv(x, w[:, :, 0], strides=s, padding=p)
      return on_cpu_else(cpu_conv, xla_conv, x, kernel)
    if groups == 1 and k == s and p == 0:
      return on_cpu_else(_patchify_conv, xla_conv, x, kernel)
    if groups == 1 and cin * k * k <= _IM2COL_MAX_DEPTH:
      cpu_conv = functools.partial(_im2col_conv, strides=s, padding=p)
      return on_cpu_else(cpu_conv, xla_conv, x, kernel)
    return xla_conv(x, kernel)


def _xla_conv(x, kernel, *, strides: int, padding: int, groups: int):
  p = padding
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


# CPU stems (3 input channels) run as one matmul over k*k*cin patch features:
# XLA CPU's convolution reaches ~5 GFLOP/s there (a ShuffleNet stem took 58 ms).
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


def _patchify_conv(x, kernel):
  """A k x k, stride-k, unpadded convolution: non-overlapping patches times the kernel.

  Like torch, rows and columns past the last whole patch are dropped.
  """
  k, _, cin, out = kernel.shape
  b, h, w, _ = x.shape
  ho, wo = h // k, w // k
  x = x[:, :ho * k, :wo * k].reshape(b, ho, k, wo, k, cin).transpose(0, 1, 3, 2, 4, 5)
  return jnp.einsum("bhwk,kd->bhwd", x.reshape(b, ho, wo, k * k * cin),
                    kernel.reshape(k * k * cin, out))


def max_pool_3x3_s2(x):
  """NHWC 3x3 max pooling, stride 2, padding 1 (the ResNet/ShuffleNet stem), as `nn.max_pool`.

  XLA's reduce-window on GPU and TPU. On CPU a separable version (below),
  ~3x faster there.
  """
  xla_pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  return on_cpu_else(_separable_max_pool_3x3_s2, xla_pool, x)


def _separable_max_pool_3x3_s2(x):
  """Rows, then columns, on a [.., h/2, 2, w/2, 2, ..] view, so every slice is
  contiguous: its backward is a few selects and plain pads, ~3x faster on CPU
  than JAX's select-and-scatter emulation (a reduce-window over value/index
  pairs) or strided slices (pads with interior padding). Ties split the
  gradient evenly where torch picks one; ties come only from equal inputs
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
      # Summed in float32 at least: nine bf16 roundings would add up.
      term = at_least_float32(_shifted(x, i, j, ho, wo, s)) * kernel[i, j]
      out = term if out is None else out + term
  return out.astype(x.dtype)


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
      term = at_least_float32(dy[:, kh - 1 - i:kh - 1 - i + h, kw - 1 - j:kw - 1 - j + w])
      dx = term * kernel[i, j] if dx is None else dx + term * kernel[i, j]
  return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with torch semantics and a fast training path.

  Training statistics are one-pass (mean and mean of squares, float32) and the
  affine is folded into one per-channel scale and shift, which measurably
  speeds up the backward pass on CPU (see shared/anchors/README.md). Running
  statistics follow torch: momentum 0.1 and the unbiased batch variance.
  `frozen=True` uses the running statistics in training too (affine still
  trained), as RAML and OBD-SD do. Statistics are over all leading axes, so a
  batch sharded over devices gets global (synchronised) statistics under jit.
  Statistics, running averages and the normalisation are float32; `dtype` is
  only the output's.
  """
  frozen: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if train and not self.frozen:
      axes = tuple(range(x.ndim - 1))
      xf = at_least_float32(x)
      mean = jnp.mean(xf, axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        unbiased = var * (n / max(n - 1, 1))
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    # The normalisation itself in float32 whatever the compute dtype: a folded
    # bf16 affine rounds `mean * mul` and `x * mul` apart, which cancels badly
    # when the mean is large against the spread. XLA fuses the casts into the
    # elementwise op, so only the output is written in the compute dtype.
    return (at_least_float32(x) * mul + add).astype(self.dtype)
