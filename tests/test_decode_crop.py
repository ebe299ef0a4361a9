"""Training crops from stored files: libjpeg-turbo decoding (DCT scaling) and
OpenCV's bilinear resize, against PIL's decoding and an exact float bilinear
reference."""
import io

import numpy as np
import pytest
from PIL import Image

from jaxdml.data import augment


def _smooth(height, width, seed=0):
  """A photo-like image: a smooth colour field (bilinear is exact on it up to rounding)."""
  small = np.random.default_rng(seed).uniform(0, 255, (4, 5, 3)).astype(np.float32)
  return np.stack([np.asarray(Image.fromarray(small[..., c]).resize((width, height),
                                                                    Image.BICUBIC))
                   for c in range(3)], -1).clip(0, 255).astype(np.uint8)


def _encoded(array, fmt="JPEG", mode=None, **kw):
  out = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(out, fmt, **kw)
  return augment.EncodedImage(out.getvalue())


def _bilinear(image, box, size, flip=False):
  """Half-pixel-centre bilinear sampling of `box` in float64; samples past
  the crop (the box widened to whole pixels) take its edge pixel."""
  left, top, w, h = box
  xs = left + (np.arange(size) + 0.5) * w / size - 0.5
  ys = top + (np.arange(size) + 0.5) * h / size - 0.5
  if flip:
    xs = xs[::-1]
  def axis(coords, start, length):
    first, last = int(np.floor(start)), int(np.ceil(start + length)) - 1
    lo = np.clip(np.floor(coords).astype(int), first, last)
    hi = np.clip(np.floor(coords).astype(int) + 1, first, last)
    return lo, hi, coords - np.floor(coords)
  (y0, y1, fy), (x0, x1, fx) = axis(ys, top, h), axis(xs, left, w)
  img = image.astype(np.float64)
  top_row = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
  bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
  return top_row * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


@pytest.mark.parametrize("shape", [(375, 500), (500, 375)])
def test_encoded_jpeg_size_and_pixels_equal_pils(shape):
  array = _smooth(*shape)
  encoded = _encoded(array, quality=90)
  assert encoded.format == "JPEG" and encoded.turbo
  assert encoded.size == Image.open(io.BytesIO(encoded.data)).size == shape[::-1]
  pixels, scale = augment.decoded_array(encoded, encoded.size)
  assert scale == (1.0, 1.0)
  pil = np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB"))
  assert np.abs(pixels.astype(int) - pil).max() <= 1


@pytest.mark.parametrize("fmt,mode", [("PNG", None), ("JPEG", "L"), ("JPEG", "CMYK")])
def test_other_files_decode_as_pil_decodes_them(fmt, mode):
  array = _smooth(30, 40)
  encoded = _encoded(array, fmt, mode)
  assert encoded.size == (40, 30)
  assert encoded.turbo == (fmt == "JPEG" and mode == "L")  # CMYK: PIL converts it
  pixels, _ = augment.decoded_array(encoded, (40, 30))
  pil = np.asarray(Image.open(io.BytesIO(encoded.data)).convert("RGB"))
  assert pixels.shape == (30, 40, 3) and np.abs(pixels.astype(int) - pil).max() <= 1


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_is_half_pixel_bilinear(flip):
  image = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)
  # Whole-pixel boxes (OpenCV's resize), up- and downscaled; fractional ones (warpAffine).
  for box in [(10.0, 5.0, 40.0, 30.0), (30, 20, 12, 16), (0, 0, 80, 60), (3.3, 7.75, 21.5, 50.2),
              (40.5, 1.25, 11.5, 9.0)]:
    got = augment.crop_resize(image, box, 24, flip=flip)
    want = _bilinear(image, box, 24, flip)
    assert got.dtype == np.uint8 and got.shape == (24, 24, 3)
    # OpenCV interpolates in fixed point (1/32 px): within 2 levels of exact.
    assert np.abs(got - want).max() <= 2.0 and np.abs(got - want).mean() < 0.5, box


def test_flip_mirrors_a_gradient_and_constants_stay_constant():
  ramp = np.broadcast_to(np.arange(0, 200, 2, dtype=np.uint8)[None, :, None], (50, 100, 3))
  plain = augment.crop_resize(ramp, (20, 10, 40, 20), 20)
  mirrored = augment.crop_resize(ramp, (20, 10, 40, 20), 20, flip=True)
  np.testing.assert_array_equal(mirrored, plain[:, ::-1])
  assert np.all(np.diff(plain[0, :, 0].astype(int)) > 0)
  flat = np.full((50, 100, 3), 77, np.uint8)
  assert np.all(augment.crop_resize(flat, (3.5, 2.25, 60, 40), 16, flip=True) == 77)


def test_a_large_jpeg_decodes_only_as_finely_as_the_crop_needs():
  """A 1600x1200 photo cropped whole to 224 px decodes at 1/4 scale (400x300,
  still more than the output), and looks like the full decode's crop."""
  array = _smooth(1200, 1600)
  encoded = _encoded(array, quality=95)
  pixels, scale = augment.decoded_array(encoded, (224 * 1600 / 1200, 224))
  assert pixels.shape == (300, 400, 3) and scale == (0.25, 0.25)
  small = augment.crop_resize(encoded, (100, 50, 1200, 1100), 224)
  full = _bilinear(array, (100, 50, 1200, 1100), 224)  # the original, not decoded
  assert np.abs(small - full).mean() < 1.5


def test_crops_render_into_a_given_array_or_refuse_one_they_cannot_use():
  image = _smooth(60, 80)
  batch = np.zeros((2, 24, 24, 3), np.uint8)
  got = augment.crop_resize(image, (10, 5, 40, 30), 24, out=batch[1])
  assert got is batch[1] or np.shares_memory(got, batch)
  np.testing.assert_array_equal(batch[1], augment.crop_resize(image, (10, 5, 40, 30), 24))
  assert not batch[0].any()
  for bad in (np.zeros((24, 24, 3), np.float32), np.zeros((24, 48, 3), np.uint8)[:, ::2]):
    with pytest.raises(ValueError, match="C-contiguous uint8"):
      augment.crop_resize(image, (10, 5, 40, 30), 24, out=bad)
