"""RAML's heavy augmentation inside the jitted step, from parameters drawn on the host.

The host draws every random number (crop boxes, flips, colour-jitter order
and factors, mixup partners and weights) with the pipeline's seeded
generator, exactly as the host version does, renders only the high-resolution
crops and ships them as uint8 with the parameters (`augment.coupled_crops`).
The step then makes both resolutions, jitters and mixes them here, so data
and augmentation stay a pure function of (seed, step) and resume stays
exact, while the pixel work runs on the accelerator.

Against the host version (`augment.coupled_views` + `blend`) on the same
parameters: brightness, contrast and saturation follow PIL's `ImageEnhance`
(a blend with a black, mean-grey or greyscale image, truncated to uint8 after
each op) to within one level; hue is an exact float HSV rotation where PIL
quantises H to 8 bits (a few levels apart); both resize the low-resolution
views from the high-resolution crop, here antialiased linear, there area
averaging (OpenCV's INTER_AREA).
"""
import jax
import jax.numpy as jnp

from jaxdml.data.augment import CROPS, FACTORS, MIXUP, ORDER  # the batch keys `apply` consumes
from jaxdml.data.augment import PARTNER_CROPS, PARTNER_FACTORS, PARTNER_ORDER

KEYS = (CROPS, ORDER, FACTORS, PARTNER_CROPS, PARTNER_ORDER, PARTNER_FACTORS, MIXUP)


def _truncate(x):
  """PIL's float -> uint8 in its blends: clip to [0, 255], truncate."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _grey(x):
  """PIL's "L" conversion (ITU-R 601-2 luma, rounded), one channel."""
  return jnp.floor((x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114) / 1000 + 0.5)[..., None]


def _blend(degenerate, x, factor):
  return _truncate(degenerate + factor * (x - degenerate))


def brightness(x, f):
  return _blend(jnp.zeros_like(x), x, f)


def contrast(x, f):
  mean = jnp.floor(jnp.mean(_grey(x), axis=(-3, -2, -1), keepdims=True) + 0.5)
  return _blend(mean, x, f)


def saturation(x, f):
  return _blend(jnp.broadcast_to(_grey(x), x.shape), x, f)


def hue(x, shift):
  """Rotates the hue by `shift` turns (float HSV, rounded back to uint8 levels);
  `shift` broadcasts against `x` without its channel axis."""
  rgb = x / 255.0
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.max(rgb, -1)
  c = v - jnp.min(rgb, -1)
  safe_c = jnp.where(c > 0, c, 1.0)
  h = jnp.where(v == r, (g - b) / safe_c, jnp.where(v == g, 2.0 + (b - r) / safe_c,
                                                     4.0 + (r - g) / safe_c))
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  h = (h + shift) % 1.0
  k = lambda n: (n + h * 6.0) % 6.0
  channel = lambda n: v - v * s * jnp.clip(jnp.minimum(k(n), 4.0 - k(n)), 0.0, 1.0)
  out = jnp.stack([channel(5.0), channel(3.0), channel(1.0)], -1)
  return jnp.clip(jnp.round(out * 255.0), 0.0, 255.0)


def color_jitter(images, order, factors):
  """`images` float [N, H, W, 3] in [0, 255]; `order` int [N, 4], a
  permutation of (brightness, contrast, saturation, hue) per image;
  `factors` float [N, 4], with 1 (0 for hue) for an op that is off."""
  ops = (brightness, contrast, saturation)
  per = lambda f: f[:, None, None, None]
  for position in range(4):
    op = order[:, position]
    f = jnp.take_along_axis(factors, op[:, None], 1)[:, 0]
    jittered = [o(images, per(f)) for o in ops]
    # An exact identity when hue is off: the float HSV round trip is not.
    shifted = jnp.where(per(f) == 0.0, images, hue(images, f[:, None, None]))
    images = jnp.select([per(op) == i for i in range(3)], jittered, shifted)
  return images


def resize(images, size: int):
  """Square `size` views of float images, antialiased linear (as PIL's bilinear)."""
  n, _, _, c = images.shape
  return jnp.clip(jnp.round(jax.image.resize(images, (n, size, size, c), "linear",
                                             antialias=True)), 0.0, 255.0)


def mix(a, b, lam):
  """`lam * a + (1 - lam) * b` per image, rounded (the host's `blend`)."""
  lam = lam[:, None, None, None]
  return jnp.clip(jnp.round(lam * a + (1.0 - lam) * b), 0.0, 255.0)


def coupled_views(batch: dict, lo: int) -> tuple:
  """`(image_hi, image_lo)` float [N, *, *, 3] in [0, 255] from a batch the
  host made with `augment.coupled_crops`."""
  def views(crops, order, factors):
    hi = crops.astype(jnp.float32)
    return color_jitter(hi, order, factors), color_jitter(resize(hi, lo), order, factors)

  hi, low = views(batch[CROPS], batch[ORDER], batch[FACTORS])
  if MIXUP in batch:
    p_hi, p_lo = views(batch[PARTNER_CROPS], batch[PARTNER_ORDER], batch[PARTNER_FACTORS])
    hi, low = mix(hi, p_hi, batch[MIXUP]), mix(low, p_lo, batch[MIXUP])
  return hi, low
