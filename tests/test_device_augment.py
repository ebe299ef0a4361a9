"""RAML's augmentation on the device against the host version, same parameters."""
import jax
import numpy as np
import pytest

from jaxdml.data import augment, device_augment


def photo(seed=0, shape=(300, 400)):
  """A smooth colourful image with edges: jitter and hue have work to do."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]] / max(shape)
  img = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0, 2, 4)], -1)
  img += rng.normal(0, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("op,factor", [(0, 1.3), (0, 0.7), (1, 1.4), (1, 0.6), (2, 1.4),
                                       (2, 0.6)])
def test_brightness_contrast_saturation_match_pil_within_one_level(op, factor):
  image = photo(op)[:64, :64]
  factors = [1.0, 1.0, 1.0, 0.0]
  factors[op] = factor
  order = [op] + [i for i in range(4) if i != op]
  host = augment.apply_color_jitter(image, (order, [f if i != op else factor for i, f in
                                                    enumerate([None] * 4)]))
  dev = device_augment.color_jitter(image[None].astype(np.float32), np.asarray([order]),
                                    np.asarray([factors], np.float32))[0]
  assert np.max(np.abs(np.asarray(dev) - host)) <= 1


def test_hue_rotation_is_within_a_few_levels_of_pils_8_bit_hsv():
  image = photo(7)[:64, :64]
  for shift in (-0.1, 0.05, 0.1):
    host = augment.adjust_hue(image, shift)
    dev = np.asarray(device_augment.hue(image[None].astype(np.float32), shift)[0])
    diff = np.abs(dev - host)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6, (shift, diff.mean())
  same = device_augment.color_jitter(image[None].astype(np.float32), np.asarray([[3, 0, 1, 2]]),
                                     np.asarray([[1.0, 1.0, 1.0, 0.0]], np.float32))
  np.testing.assert_array_equal(np.asarray(same)[0], image)  # every op off: unchanged


def test_device_views_match_the_host_views_drawn_from_the_same_seed():
  """Same (seed, image): the crops, flips and jitter the host version draws.
  Stated tolerance: hi views within 2 levels on average (hue's 8-bit HSV),
  lo views within 2.5 (both reduce the hi crop: antialiased linear on the
  device, area averaging on the host)."""
  image = photo(3)
  kw = dict(num_views=4, hi=96, scale=(0.2, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1))
  host_hi, host_lo = augment.coupled_views(image, np.random.default_rng(5), lo=48, **kw)
  crops, order, factors = augment.coupled_crops(image, np.random.default_rng(5), **kw)
  batch = {device_augment.CROPS: crops, device_augment.ORDER: order,
           device_augment.FACTORS: factors}
  dev_hi, dev_lo = jax.jit(device_augment.coupled_views, static_argnums=1)(batch, 48)
  hi_diff = np.abs(np.asarray(dev_hi) - host_hi)
  lo_diff = np.abs(np.asarray(dev_lo) - host_lo)
  assert hi_diff.mean() < 2.0 and lo_diff.mean() < 2.5, (hi_diff.mean(), lo_diff.mean())
  lam = np.asarray([0.25, 0.5, 1.0, 0.0], np.float32)
  mixed = device_augment.mix(dev_hi, dev_hi[::-1], lam)
  np.testing.assert_allclose(np.asarray(mixed), augment.blend(
      np.asarray(dev_hi), np.asarray(dev_hi)[::-1], lam[:, None, None, None]), atol=1)
