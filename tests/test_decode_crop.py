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


def _with_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
  """`png` with a chunk inserted right after IHDR (which ends at byte 33)."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  chunk = struct.pack(">I", len(payload)) + kind + payload
  return png[:33] + chunk + struct.pack(">I", zlib.crc32(kind + payload)) + png[33:]


def _png_variant(variant):
  rng = np.random.default_rng(3)
  rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
  out = io.BytesIO()
  image = Image.fromarray(rgba[..., :3])
  if variant in ("RGB", "L", "1"):
    image.convert(variant).save(out, "PNG")
  elif variant in ("RGBA", "LA"):
    Image.fromarray(rgba).convert(variant).save(out, "PNG")
  elif variant == "P":
    image.quantize(200).save(out, "PNG")
  elif variant == "P 4-bit, transparent":
    image.quantize(16).save(out, "PNG", bits=4, transparency=3)
  elif variant == "RGB with gAMA":
    image.save(out, "PNG")
    return _with_chunk(out.getvalue(), b"gAMA", (100000).to_bytes(4, "big"))  # gamma 1.0
  elif variant == "RGB 16-bit":  # PIL's turn: it reads 16 bits otherwise than libpng
    import cv2  # pylint: disable=g-import-not-at-top
    return cv2.imencode(".png", rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16))[1].tobytes()
  return out.getvalue()


@pytest.mark.parametrize("variant", ["RGB", "RGBA", "L", "LA", "1", "P", "P 4-bit, transparent",
                                     "RGB with gAMA", "RGB 16-bit"])
def test_pngs_decode_to_the_pixels_pil_decodes(variant):
  data = _png_variant(variant)
  encoded = augment.EncodedImage(data)
  pil = Image.open(io.BytesIO(data))
  assert encoded.format == "PNG" and encoded.size == pil.size == (40, 30)
  assert encoded.libpng == (variant != "RGB 16-bit")
  pixels, scale = augment.decoded_array(encoded, (20, 15))
  assert scale == (1.0, 1.0) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
  np.testing.assert_array_equal(pixels, np.asarray(pil.convert("RGB")))
  box = (3, 5, 17, 13)  # a crop: libpng's pixels through the same resize
  np.testing.assert_array_equal(augment.crop_resize(encoded, box, 8),
                                augment.crop_resize(np.asarray(pil.convert("RGB")), box, 8))


def test_a_damaged_png_names_the_problem():
  data = _png_variant("RGB")
  encoded = augment.EncodedImage(data[:60])  # the header is intact, the pixels are cut off
  assert encoded.libpng and encoded.size == (40, 30)
  with pytest.raises(ValueError, match=r"libpng could not decode this PNG \(60 bytes\).*"
                                       r"--skip_bad_images"):
    augment.decoded_array(encoded, (40, 30))


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


def _headers_found():
  import glob  # pylint: disable=g-import-not-at-top
  return bool(glob.glob("/usr/include/jpeglib.h") + glob.glob("/usr/local/include/jpeglib.h"))


def test_the_region_decoder_is_built_where_libjpeg_turbos_headers_are():
  """Without this, a build that silently skipped the extension would pass
  every test below on the slower full-decode path."""
  if not _headers_found():
    pytest.skip("no jpeglib.h: pip skips the optional _jpeg_region extension here")
  assert augment._jpeg_region is not None, (
      "jaxdml.data._jpeg_region was not built although jpeglib.h exists: reinstall "
      "(pip install -e .) and read the compiler's error")


_REGION = pytest.mark.skipif(augment._jpeg_region is None, reason="_jpeg_region not built")

# Layouts libjpeg handles differently: chroma subsampling (fancy upsampling
# across the crop's edges), progressive scans, one component, odd sizes.
_VARIANTS = {
    "420_q90": dict(quality=90),
    "444": dict(quality=90, subsampling=0),
    "422": dict(quality=85, subsampling=1),
    "progressive": dict(quality=90, progressive=True),
    "gray": dict(quality=90, mode="L"),
}


@_REGION
@pytest.mark.parametrize("variant", sorted(_VARIANTS))
@pytest.mark.parametrize("shape", [(375, 500), (251, 333)])
def test_region_decode_equals_the_same_rectangle_of_a_full_decode(variant, shape):
  import simplejpeg  # pylint: disable=g-import-not-at-top
  kw = dict(_VARIANTS[variant])
  noisy = np.clip(_smooth(*shape).astype(int)
                  + np.random.default_rng(1).integers(-20, 21, shape + (3,)), 0, 255)
  encoded = _encoded(noisy.astype(np.uint8), mode=kw.pop("mode", None), **kw)
  rng = np.random.default_rng(0)
  for factor in (1, 2, 4, 8):
    size = {} if factor == 1 else {"min_width": -(-shape[1] // factor),
                                   "min_height": -(-shape[0] // factor)}
    full = simplejpeg.decode_jpeg(encoded.data, colorspace="RGB", **size)
    height, width = full.shape[:2]
    # Random rectangles, the whole image, and ones touching each edge.
    boxes = [(0, 0, width, height), (width - 1, height - 1, 1, 1), (0, 3, 5, height - 3)]
    for _ in range(12):
      w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
      boxes.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    for left, top, w, h in boxes:
      got = np.empty((h, w, 3), np.uint8)
      augment._jpeg_region.decode_region(encoded.data, factor, left, top, w, h, got)
      np.testing.assert_array_equal(got, full[top:top + h, left:left + w],
                                    err_msg=f"{variant} 1/{factor} {(left, top, w, h)}")


@_REGION
def test_crops_are_the_same_pixels_with_and_without_the_region_decoder(monkeypatch):
  encoded = _encoded(_smooth(375, 500), quality=90)
  rng = np.random.default_rng(5)
  boxes = [augment.random_resized_crop_box(rng, 375, 500) for _ in range(20)]
  boxes += [(3.3, 7.75, 121.5, 50.2), (0, 0, 500, 375), (480, 360, 20, 15)]  # fractional, edges
  with_region = [augment.crop_resize(encoded, box, 64, flip=i % 2 == 1) for i, box in enumerate(boxes)]
  monkeypatch.setattr(augment, "_jpeg_region", None)
  for i, (box, got) in enumerate(zip(boxes, with_region)):
    np.testing.assert_array_equal(got, augment.crop_resize(encoded, box, 64, flip=i % 2 == 1),
                                  err_msg=str(box))


@_REGION
@pytest.mark.parametrize("variant", ["420_q90", "422", "progressive", "gray"])
@pytest.mark.parametrize("shape, resize, size", [
    ((375, 500), 256, 224), ((500, 375), 256, 224), ((251, 333), 64, 56),  # 64: DCT 1/2, 1/4
    ((90, 120), 256, 224), ((375, 500), 40, 8)])  # upsampled; a small crop: 1/8
def test_irt_crops_decode_only_their_window_and_are_the_same_pixels(variant, shape, resize,
                                                                      size, monkeypatch):
  """IRT's crop decodes only the window its crop of the resized image reads
  (`_decoded_for_square_crop`). Noise written over everything outside that
  window must not reach the crop: the window covers every pixel the
  bilinear resize reads for it."""
  kw = dict(_VARIANTS[variant])
  noisy = np.clip(_smooth(*shape).astype(int)
                  + np.random.default_rng(1).integers(-20, 21, shape + (3,)), 0, 255)
  encoded = _encoded(noisy.astype(np.uint8), mode=kw.pop("mode", None), **kw)
  rng = np.random.default_rng(2)
  crops = [(0, 0), (resize - size, resize - size)] + [
      augment.square_crop_offsets(rng, resize=resize, size=size) for _ in range(6)]
  cv2 = augment._opencv()
  got = {}
  for i, (left, top) in enumerate(crops):
    pixels, (x0, y0, x1, y1) = augment._decoded_for_square_crop(encoded, resize, (left, top, size))
    outside = np.ones(pixels.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    pixels[outside] = rng.integers(0, 256, (outside.sum(), 3))
    if variant == "420_q90" and resize == 256:  # a 224 crop of 256 reads ~77 % of the image
      assert 0.6 < (x1 - x0) * (y1 - y0) / outside.size < 0.85
    square = cv2.resize(pixels, (resize, resize), interpolation=cv2.INTER_LINEAR)
    got[i] = square[top:top + size, left:left + size]
    np.testing.assert_array_equal(  # and the pipeline's own call, flipped
        augment.resized_square_crop(encoded, (left, top), resize=resize, size=size, flip=True),
        got[i][:, ::-1])
  monkeypatch.setattr(augment, "_jpeg_region", None)
  for i, offsets in enumerate(crops):
    np.testing.assert_array_equal(
        got[i], augment.resized_square_crop(encoded, offsets, resize=resize, size=size),
        err_msg=f"{variant} {shape} {offsets}")


@_REGION
def test_region_decoder_errors_name_the_problem():
  encoded = _encoded(_smooth(30, 40), quality=90)
  region = augment._jpeg_region.decode_region
  with pytest.raises(ValueError, match=r"leaves the 40x30 image decoded at 1/1"):
    region(encoded.data, 1, 30, 0, 11, 5, np.empty((5, 11, 3), np.uint8))
  with pytest.raises(ValueError, match=r"leaves the 20x15 image decoded at 1/2"):
    region(encoded.data, 2, 0, 10, 4, 6, np.empty((6, 4, 3), np.uint8))
  with pytest.raises(ValueError, match=r"leaves the 40x30 image"):  # left + width past int's range
    region(encoded.data, 1, 2**31 - 1, 0, 2, 1, np.empty((1, 2, 3), np.uint8))
  for out in (np.empty((4, 5, 3), np.uint8), np.empty((4, 8, 3), np.uint8)[:, ::2],
              np.empty((4, 4, 3), np.float32)):
    with pytest.raises(ValueError, match=r"out must be a uint8 \[height, width, 3\] array"):
      region(encoded.data, 1, 0, 0, 4, 4, out)
  with pytest.raises(ValueError, match="denom must be 1, 2, 4 or 8"):
    region(encoded.data, 3, 0, 0, 4, 4, np.empty((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="libjpeg could not decode the file"):
    region(b"\xff\xd8\xff" + b"\x00" * 64, 1, 0, 0, 4, 4, np.empty((4, 4, 3), np.uint8))
  with pytest.raises(BufferError):  # the output must be writable
    region(encoded.data, 1, 0, 0, 4, 4, b"\x00" * 48)


@_REGION
def test_region_decoder_writes_into_rows_of_a_larger_image():
  """`out` may be a window of a larger image (IRT's crop decodes into its
  place in a whole-image canvas): only that window is written."""
  encoded = _encoded(_smooth(120, 160, seed=2), quality=90)
  full = augment.decoded_array(encoded, (160, 120))[0]
  canvas = np.full((120, 160, 3), 7, np.uint8)
  augment._jpeg_region.decode_region(encoded.data, 1, 35, 20, 90, 70, canvas[20:90, 35:125])
  np.testing.assert_array_equal(canvas[20:90, 35:125], full[20:90, 35:125])
  canvas[20:90, 35:125] = 7
  assert (canvas == 7).all()


@_REGION
@pytest.mark.parametrize("num_views", [1, 3])
def test_raml_crops_are_the_same_with_and_without_the_region_decoder(num_views, monkeypatch):
  """A lone view (RAML's mixup partner) decodes only its box; several share
  one whole decode. Either way the crops, flips and jitter draws are the
  full decode's."""
  encoded = _encoded(_smooth(375, 500, seed=4), quality=90)
  kw = dict(num_views=num_views, hi=64, color_jitter=(0.4, 0.4, 0.4, 0.1))
  got = augment.coupled_crops(encoded, np.random.default_rng(3), **kw)
  views = augment.coupled_views(encoded, np.random.default_rng(3), lo=32, **kw)
  monkeypatch.setattr(augment, "_jpeg_region", None)
  for a, b in zip(got, augment.coupled_crops(encoded, np.random.default_rng(3), **kw)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(views, augment.coupled_views(encoded, np.random.default_rng(3), lo=32, **kw)):
    np.testing.assert_array_equal(a, b)
