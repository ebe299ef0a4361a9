"""Position-embedding resampling, as timm's `resample_abs_pos_embed`.

timm resizes a ViT's absolute position embedding with torch's
`F.interpolate(mode="bicubic", align_corners=False)` over the patch grid,
keeping the prefix tokens (CLS, registers) as they are. Its checkpoint
filter and its dynamic image size use `antialias=True` (the default of
`resample_abs_pos_embed`), a few of its models `antialias=False`. The two are
different filters in torch, transcribed here as `[out, in]` matrices
(`bicubic_matrix`), so the resize is two small matmuls that differentiate
like any other (a model run at another input size trains its 224 px table).
"""
import functools

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`, for any real x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """`[out_size, in_size]` float64 weights of torch's 1-D bicubic resize (align_corners=False).

  antialias=False (torch's `upsample_bicubic2d`): four taps at
  floor(src) - 1 .. floor(src) + 2 with src = (i + 0.5) * in/out - 0.5, Keys
  a = -0.75, indices clamped to the edge. antialias=True (torch's
  `_upsample_bicubic2d_aa`, PIL's filter): Keys a = -0.5 stretched by in/out
  when shrinking, taps outside the input dropped and the rest renormalised.
  """
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    if antialias:
      support = 2.0 * max(scale, 1.0)
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      w = _cubic((taps - center + 0.5) / max(scale, 1.0), -0.5)
      weights[i, taps] = w / w.sum()
    else:
      src = (i + 0.5) * scale - 0.5
      base = int(np.floor(src))
      t = src - base
      for offset, w in zip((-1, 0, 1, 2), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        weights[i, min(max(base + offset, 0), in_size - 1)] += w
  return weights


def resample_pos_embed(pos_embed, grid: tuple[int, int], *, num_prefix_tokens: int = 1,
                       antialias: bool = True):
  """`[1, num_prefix_tokens + h*w, D]` position embedding resized to `grid` patches.

  The first `num_prefix_tokens` rows (CLS, registers: 0 for a model whose
  prefix tokens carry no position, DINOv2 with registers) are kept; the
  square `h x w` patch grid after them is resized bicubically in float32, as
  timm's `resample_abs_pos_embed(..., antialias=antialias)`. Returns the
  input itself when the grid already matches.
  """
  n = pos_embed.shape[1] - num_prefix_tokens
  old = int(round(max(n, 0) ** 0.5))
  if n <= 0 or old * old != n:
    raise ValueError(f"pos_embed with {pos_embed.shape[1]} rows and {num_prefix_tokens} prefix "
                     f"tokens does not hold a square patch grid; check num_prefix_tokens "
                     "(0 for DINOv2 with registers, 1 for a CLS token).")
  if (old, old) == tuple(grid):
    return pos_embed
  d = pos_embed.shape[-1]
  patches = pos_embed[0, num_prefix_tokens:].reshape(old, old, d).astype(jnp.float32)
  rows = jnp.asarray(bicubic_matrix(old, grid[0], antialias), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(old, grid[1], antialias), jnp.float32)
  patches = jnp.einsum("yh,hwd,xw->yxd", rows, patches, cols,
                       precision="highest").reshape(1, -1, d).astype(pos_embed.dtype)
  return jnp.concatenate([pos_embed[:, :num_prefix_tokens], patches], 1)
