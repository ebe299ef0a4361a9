"""Per-image augmentations (on the host) and on-device normalisation.

Host transforms take a uint8 [H, W, 3] image (or a stored file,
`EncodedImage`) and an `np.random.Generator` and return uint8; the pipeline
seeds the generator from (seed, step, row), so augmentations are
reproducible and independent of threading. The random draws follow
torchvision's defaults (RandomResizedCrop, RandomHorizontalFlip,
ColorJitter) and its PIL backend's colour operations. Training crops are
decoded by libjpeg-turbo (only the crop's rectangle, `_jpeg_region`, where
it was built; else the whole image, simplejpeg) and resized by OpenCV: all
release the GIL, so the pipeline's threads use every core.
"""
import math

import numpy as np

from jaxdml import extras

try:
  from jaxdml.data import _jpeg_region  # pylint: disable=g-import-not-at-top
except ImportError:  # built only where libjpeg-turbo's headers were found (pyproject.toml)
  _jpeg_region = None

# ImageNet statistics, the ones every pretrained encoder here expects.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# Batch keys the host ships for RAML's device augmentation (`coupled_crops`
# makes them, `device_augment.apply` consumes them). Here, not there: worker
# processes make batches without importing JAX (~160 MB each).
CROPS, ORDER, FACTORS = "crops_hi", "jitter_order", "jitter_factors"
PARTNER_CROPS, PARTNER_ORDER, PARTNER_FACTORS = "partner_hi", "partner_order", "partner_factors"
MIXUP = "mixup_lambda"


def normalize(images):
  """uint8 [..., 3] -> float32 `(x / 255 - MEAN) / STD`; runs on device."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (workers never normalise)
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


class EncodedImage:
  """A stored image file, not decoded: what `Source.lazy_image` hands a
  transform, so a crop decodes only what it needs. `size` is (W, H) read
  from the header (no decode; a PNG's without PIL); `format` is "JPEG",
  "PNG", ..."""

  def __init__(self, data: bytes):
    self.data = data
    self.turbo = False  # decoded by libjpeg-turbo (simplejpeg); else by PIL
    self.libpng = False  # an 8-bit PNG, decoded by OpenCV's libpng; else by PIL
    png = _png_header(data)
    if png is not None and png[2] <= 8:
      self.libpng = True
      self.format, self.size = "PNG", png[:2]
      return
    if data[:3] == b"\xff\xd8\xff":
      simplejpeg = extras.require("simplejpeg", "the image transforms of the data pipeline")
      try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
      except ValueError:  # a JPEG libjpeg-turbo cannot parse: PIL's turn
        pass
      else:
        # libjpeg-turbo does not turn CMYK into RGB; PIL does.
        self.turbo = colorspace not in ("CMYK", "YCCK")
        self.format, self.size = "JPEG", (width, height)
        return
    pil = self.to_pil()
    self.format, self.size = pil.format, pil.size

  def to_pil(self):
    """The file opened with PIL (decoded when its pixels are read)."""
    import io  # pylint: disable=g-import-not-at-top
    Image = extras.require("PIL.Image", "the image transforms of the data pipeline")
    return Image.open(io.BytesIO(self.data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes):
  """`(width, height, bit depth)` from a PNG's IHDR chunk, which the format
  puts first; None where `data` does not start like a PNG."""
  if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
    return None
  return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), data[24])


def _decode_png(data: bytes):
  """An 8-bit PNG decoded to uint8 RGB by OpenCV's libpng: the pixels PIL
  decodes (every colour type, palette and alpha dropped as PIL's
  `convert("RGB")` drops them: tests/test_decode_crop.py), straight into
  an array: 0.48 against 0.59 ms for a crop of a 256 px sketch, without
  PIL's image object and its copy into numpy (docs/benchmarks.md). No
  EXIF rotation, as no other decode here applies one."""
  cv2 = _opencv()
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8),
                        cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if pixels is None:
    raise ValueError(f"libpng could not decode this PNG ({len(data)} bytes): the file is damaged. "
                     "Replace it, or prepare the data set again with data_prep's "
                     "--skip_bad_images.")
  return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=pixels)  # in place: BGR is OpenCV's order


def height_width(image) -> tuple[int, int]:
  """(H, W) of an array, an `EncodedImage` or an opened, not yet decoded, PIL image."""
  if hasattr(image, "size") and not isinstance(image, np.ndarray):
    return image.size[1], image.size[0]
  return tuple(np.shape(image)[:2])


_CV2 = None


def _opencv():
  """cv2, its own thread pool turned off (once per process that crops).

  The pipeline's threads (or worker processes) already keep every core
  busy; OpenCV's pool split each 224 px warp across threads that then
  waited on each other: ~0.6 ms of system CPU per image with one pipeline
  thread, and no faster (docs/benchmarks.md). The setting is per process,
  as OpenCV has it.
  """
  global _CV2
  if _CV2 is None:
    cv2 = extras.require("cv2", "the image transforms of the data pipeline")
    cv2.setNumThreads(1)
    _CV2 = cv2
  return _CV2


def _dct_scale(width, height, scale_to) -> tuple[int, tuple[int, int]]:
  """`(factor, (w', h'))`: the largest JPEG DCT-domain reduction (1, 2, 4 or
  8) that still leaves `scale_to = (w, h)` pixels for the whole image, and
  the size libjpeg decodes at (rounded up, as simplejpeg's and
  `_jpeg_region`'s decodes both have it)."""
  factor = 1
  while factor < 8 and width / (2 * factor) >= scale_to[0] and height / (2 * factor) >= scale_to[1]:
    factor *= 2
  return factor, (-(-width // factor), -(-height // factor))


def decoded_array(image, scale_to: tuple[int, int]):
  """`image` decoded to uint8 RGB [H', W', 3] and its size relative to the
  original (sx, sy). A JPEG is decoded with libjpeg-turbo (simplejpeg) at
  the smallest DCT scale that still holds `scale_to = (w, h)` pixels for the
  whole image: a crop that ends up at 224 px never pays for decoding the
  rest at full resolution. An 8-bit PNG is decoded by libpng (`_decode_png`);
  anything else by PIL."""
  if isinstance(image, np.ndarray):
    return to_rgb(image), (1.0, 1.0)
  width, height = image.size
  if isinstance(image, EncodedImage) and image.turbo:
    simplejpeg = extras.require("simplejpeg", "the image transforms of the data pipeline")
    factor, (min_width, min_height) = _dct_scale(width, height, scale_to)
    # Asking for a size at all takes a slower path in simplejpeg (2x): only when it pays.
    kw = {} if factor == 1 else {"min_width": min_width, "min_height": min_height}
    pixels = simplejpeg.decode_jpeg(image.data, colorspace="RGB", **kw)
  elif isinstance(image, EncodedImage) and image.libpng:
    pixels = _decode_png(image.data)
  else:
    pil, _ = decoded_for(image, scale_to)
    pixels = np.asarray(pil)
  return pixels, (pixels.shape[1] / width, pixels.shape[0] / height)


def _region_decodable(image) -> bool:
  """Whether `_jpeg_region` can decode part of `image`: it was built and
  the image is a stored JPEG that libjpeg-turbo reads."""
  return _jpeg_region is not None and isinstance(image, EncodedImage) and image.turbo


def decoded_crop(image, box, scale_to: tuple[int, int]):
  """The whole decoded pixels under `box = (left, top, w, h)` (original
  pixels), decoded as `decoded_array` decodes them (same scale, same
  pixels): `(crop uint8 [h', w', 3], (x0, y0) its corner in decoded pixels,
  (sx, sy) the decoded size relative to the original)`.

  A JPEG that libjpeg-turbo reads is decoded over the crop's rectangle
  alone where `_jpeg_region` was built: 0.51 against 0.60 ms for a random
  resized crop of a 500x375 photo (docs/benchmarks.md).
  """
  height, width = height_width(image)
  region = _region_decodable(image)
  if region:
    factor, decoded = _dct_scale(width, height, scale_to)
  else:
    pixels, _ = decoded_array(image, scale_to)
    decoded = (pixels.shape[1], pixels.shape[0])
  sx, sy = decoded[0] / width, decoded[1] / height
  x0, y0 = math.floor(box[0] * sx), math.floor(box[1] * sy)
  x1 = min(decoded[0], math.ceil(box[0] * sx + box[2] * sx))
  y1 = min(decoded[1], math.ceil(box[1] * sy + box[3] * sy))
  if not region:
    return pixels[y0:y1, x0:x1], (x0, y0), (sx, sy)
  crop = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
  _jpeg_region.decode_region(image.data, factor, x0, y0, x1 - x0, y1 - y0, crop)
  return crop, (x0, y0), (sx, sy)


def decoded_for(image, scale_to: tuple[int, int]):
  """A decoded RGB PIL image and its size relative to `image`'s (sx, sy).

  `image` is an array, an `EncodedImage` or an opened PIL image. A JPEG is
  decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that still holds
  `scale_to = (w, h)` pixels for the whole image.
  """
  Image = extras.require("PIL.Image", "the image transforms of the data pipeline")
  if isinstance(image, EncodedImage):
    image = image.to_pil()
  if isinstance(image, np.ndarray) or not hasattr(image, "draft"):
    return Image.fromarray(to_rgb(image)), (1.0, 1.0)
  width, height = image.size
  if image.format == "JPEG":
    image.draft("RGB", (max(1, math.ceil(scale_to[0])), max(1, math.ceil(scale_to[1]))))
  sx, sy = image.size[0] / width, image.size[1] / height
  # `convert` copies even an RGB image; an RGB one is used as it is.
  return (image if image.mode == "RGB" else image.convert("RGB")), (sx, sy)


def to_rgb(image):
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an [H, W, C] image with C in (1, 3, 4); got shape {image.shape}.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def random_resized_crop_box(rng, height, width, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision `RandomResizedCrop.get_params`: `(left, top, w, h)`.

  Ten tries at an area fraction in `scale` and a log-uniform aspect in
  `ratio`; after that, the largest centred crop of an in-range aspect.
  (torchvision's default scale is (0.08, 1); ours is (0.2, 1), configurable.)
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def square_crop_offsets(rng, *, resize, size):
  """`(left, top)` of a random `size` crop of an image resized to `resize` x `resize`."""
  if resize < size:
    raise ValueError(f"augment.resize_square={resize} is smaller than the crop ({size} px).")
  left, top = (int(rng.integers(0, resize - size + 1)) for _ in range(2))
  return left, top


def resized_square_crop(image, offsets, *, resize, size, flip=False, out=None):
  """IRT's crop, as its paper and config say: the image resized to `resize`
  x `resize` (aspect not kept; bilinear with half-pixel centres, not
  antialiased, after JPEG DCT scaling as `crop_resize`), then the `size`
  crop at `offsets = (left, top)`, flipped or not. Two OpenCV calls: one
  `resize` of the whole image measured half the time of one `warpAffine` of
  the equivalent fractional box."""
  cv2 = _opencv()
  _check_out(out, size)
  left, top = offsets
  pixels, _ = _decoded_for_square_crop(image, resize, (left, top, size))
  square = cv2.resize(pixels, (resize, resize), interpolation=cv2.INTER_LINEAR)
  crop = square[top:top + size, left:left + size]
  if flip:
    return cv2.flip(crop, 1, dst=out)
  if out is None:
    return np.ascontiguousarray(crop)
  out[...] = crop
  return out


def _decoded_for_square_crop(image, resize, crop):
  """`(pixels, window)`: the decoded image `resized_square_crop` resizes, as
  `decoded_array` decodes it, but with only the `window = (x0, y0, x1, y1)`
  that the `crop = (left, top, size)` of the `resize` x `resize` image
  samples decoded where `_jpeg_region` was built (else the whole image,
  window None). Pixels outside the window hold whatever the buffer held;
  they reach only resized pixels the crop drops. For a 256 -> 224 crop the
  window is ~77 % of the image."""
  if not _region_decodable(image):
    return decoded_array(image, (resize, resize))[0], None
  width, height = image.size
  factor, (w, h) = _dct_scale(width, height, (resize, resize))
  left, top, size = crop
  x0, x1 = _bilinear_source_span(left, size, w, resize)
  y0, y1 = _bilinear_source_span(top, size, h, resize)
  canvas = np.empty((h, w, 3), np.uint8)
  _jpeg_region.decode_region(image.data, factor, x0, y0, x1 - x0, y1 - y0, canvas[y0:y1, x0:x1])
  return canvas, (x0, y0, x1, y1)


def _bilinear_source_span(start, length, source, resized) -> tuple[int, int]:
  """`[first, last)` source pixels that a half-pixel-centre bilinear resize
  of `source` to `resized` pixels reads for outputs `[start, start +
  length)`: output x samples `(x + 1/2) * source / resized - 1/2` and its
  right neighbour, clamped to the image. One pixel more each side absorbs
  OpenCV's single-precision coordinates."""
  scale = source / resized
  first = math.floor((start + 0.5) * scale - 0.5) - 1
  last = math.floor((start + length - 0.5) * scale - 0.5) + 3
  return max(0, first), min(source, last)


def _check_out(out, size):
  if out is not None and not (out.dtype == np.uint8 and out.shape == (size, size, 3)
                              and out.flags.c_contiguous):
    raise ValueError(f"out must be a C-contiguous uint8 [{size}, {size}, 3] array; got "
                     f"{out.dtype} {out.shape}.")


def crop_resize(image, box, size, *, flip=False, out=None):
  """Crops `box = (left, top, w, h)` (fractional original pixels) and resizes
  it to `size` x `size`.

  The filter: JPEG DCT-domain downscaling by 2^k (`decoded_crop`), which
  leaves at most a 2x reduction, then bilinear interpolation with
  half-pixel centres (TensorFlow's and big_vision's bilinear), not
  antialiased: a reduction under 2x blends the 2x2 source pixels nearest
  each output pixel's centre. Samples past the crop's edge take the edge
  pixel, as cropping and then resizing does (torchvision, tf.image). A box
  on whole decoded pixels (random resized crops) goes through OpenCV's
  `resize`, about half the time of `warpAffine` at 224 px (0.13 against
  0.27-0.31 ms with a flip), which takes the fractional ones; the two agree
  (tests/test_decode_crop.py).
  `image`: an array, an `EncodedImage` or an opened PIL image.
  """
  cv2 = _opencv()
  _check_out(out, size)  # before the decode it would waste
  height, width = height_width(image)
  scale_to = (width * size / box[2], height * size / box[3])
  crop, (x0, y0), (sx, sy) = decoded_crop(image, box, scale_to)
  left, top, w, h = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy  # decoded pixels
  if all(float(v).is_integer() for v in (left, top, w, h)):
    out = cv2.resize(crop, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
    return cv2.flip(out, 1, dst=out) if flip else out
  # Output pixel centre x + 1/2 samples the source at left + (x + 1/2) * w / size,
  # in decoded pixels, whose own centres sit at + 1/2; the crop starts at x0.
  # Flipped, it samples left + w - (x + 1/2) * w / size.
  fx, fy = w / size, h / size
  row_x = ([-fx, 0.0, left + w - x0 - 0.5 * fx - 0.5] if flip
           else [fx, 0.0, left - x0 + 0.5 * fx - 0.5])
  to_source = np.array([row_x, [0.0, fy, top - y0 + 0.5 * fy - 0.5]])
  return cv2.warpAffine(crop, to_source, (size, size), dst=out,
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def resize_center_crop(image, *, size, resize=None):
  """Shorter side to `resize` (default `size`), then a centred `size` crop."""
  Image = extras.require("PIL.Image", "the image transforms of the data pipeline")
  resize = resize or size
  h, w = height_width(image)
  s = resize / min(h, w)
  nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
  pil, _ = decoded_for(image, (nw, nh))
  out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return out[top:top + size, left:left + size]


def eval_transform(image, *, size, resize_ratio=8 / 7):
  """RAML's evaluation transform: shorter side to `size * 8/7`, centre crop."""
  return resize_center_crop(image, size=size, resize=int(round(size * resize_ratio)))


def jitter_strengths(color_jitter):
  """Config value -> (brightness, contrast, saturation, hue).

  A float x means (x, x, x, 0) (our choice: hue off unless asked for); a
  tuple of 4 is taken as is; 0/None/False disables jitter.
  """
  if not color_jitter:
    return (0.0, 0.0, 0.0, 0.0)
  if isinstance(color_jitter, (int, float)):
    return (float(color_jitter),) * 3 + (0.0,)
  cj = tuple(float(v) for v in color_jitter)
  if len(cj) != 4 or cj[3] > 0.5 or min(cj) < 0:
    raise ValueError("color_jitter must be a float or (brightness, contrast, saturation, hue) "
                     f"with all >= 0 and hue <= 0.5; got {color_jitter}.")
  return cj


def color_jitter_params(rng, strengths):
  """torchvision `ColorJitter.get_params`: a random op order and factors."""
  b, c, s, h = strengths
  factors = (rng.uniform(max(0, 1 - b), 1 + b) if b else None,
             rng.uniform(max(0, 1 - c), 1 + c) if c else None,
             rng.uniform(max(0, 1 - s), 1 + s) if s else None,
             rng.uniform(-h, h) if h else None)
  return tuple(int(i) for i in rng.permutation(4)), factors


def adjust_hue(image, hue):
  """Shifts the hue of a uint8 RGB image by `hue` turns, as torchvision's PIL path.

  PIL's 8-bit HSV: H is quantised to 256 levels and the round trip rounds,
  so this is approximate (a few levels) against an exact float HSV rotation
  (torchvision's tensor path). It is the costliest jitter op (~5 ms at 224
  px; a vectorised numpy HSV version measured 3x slower).
  """
  Image = extras.require("PIL.Image", "the image transforms of the data pipeline")
  h, s, v = Image.fromarray(image).convert("HSV").split()
  shifted = (np.asarray(h, np.int16) + int(round(hue * 255))) % 256
  hsv = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v))
  return np.asarray(hsv.convert("RGB"))


def apply_color_jitter(image, params):
  """Applies `color_jitter_params` output with torchvision's PIL-path pixel ops."""
  Image = extras.require("PIL.Image", "the image transforms of the data pipeline")
  ImageEnhance = extras.require("PIL.ImageEnhance", "the image transforms of the data pipeline")
  order, factors = params
  out = image
  for i in order:
    f = factors[i]
    if f is None:
      continue
    if i == 3:
      out = adjust_hue(out, f)
      continue
    enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
    out = np.asarray(enhance(Image.fromarray(out)).enhance(f))
  return out


def train_transform(image, rng, *, size, random_resized_crop=True, scale=(0.2, 1.0),
                    ratio=(3 / 4, 4 / 3), flip=True, color_jitter=0.0, resize_square=None,
                    mirror=None, out=None):
  """Training view: a crop, flip, jitter.

  The crop: with `resize_square=R`, the image resized to R x R and a random
  `size` crop of that (IRT); else a random resized crop; else (both off) the
  shorter side to `size` and a centre crop. The flip: drawn with `flip`, or
  `mirror` (True/False) where the caller drew it (an SBIR pair shares one).
  `out`: a uint8 [size, size, 3] array a crop without jitter is rendered
  into (a batch's row); the result is returned either way.
  """
  box = offsets = None
  if resize_square:
    offsets = square_crop_offsets(rng, resize=int(resize_square), size=size)
  elif random_resized_crop:
    box = random_resized_crop_box(rng, *height_width(image), scale=scale, ratio=ratio)
  flipped = bool(mirror) if mirror is not None else flip and rng.random() < 0.5
  if offsets is not None:
    view = resized_square_crop(image, offsets, resize=int(resize_square), size=size,
                               flip=flipped, out=out)
  elif box is not None:
    view = crop_resize(image, box, size, flip=flipped, out=out)
  else:
    view = resize_center_crop(image, size=size)
    view = np.ascontiguousarray(view[:, ::-1]) if flipped else view
  strengths = jitter_strengths(color_jitter)
  if not any(strengths):  # nothing to draw: the permutation alone cost ~6 us a crop
    return view
  return apply_color_jitter(view, color_jitter_params(rng, strengths))


def coupled_views(image, rng, *, num_views, hi, lo, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                  flip=True, color_jitter=0.0):
  """RAML's coupled views: each view is one crop rendered at `hi` and `lo` px.

  Both renderings of a view share the crop box, the flip and the jitter
  factors: the `lo` view is the `hi` crop reduced by area averaging
  (OpenCV's INTER_AREA, antialiased), then jittered, as the train step's
  device version makes it (`device_augment.coupled_views`).

  Returns:
    `(views_hi uint8 [num_views, hi, hi, 3], views_lo uint8 [num_views, lo, lo, 3])`.
  """
  pixels, draws = _coupled_draws(image, rng, num_views=num_views, scale=scale, ratio=ratio,
                                 flip=flip, color_jitter=color_jitter)
  cv2 = _opencv()
  out_hi, out_lo = [], []
  for box, flipped, params in draws:
    crop = crop_resize(pixels, box, hi, flip=flipped)
    out_lo.append(apply_color_jitter(cv2.resize(crop, (lo, lo), interpolation=cv2.INTER_AREA),
                                     params))
    out_hi.append(apply_color_jitter(crop, params))
  return np.stack(out_hi), np.stack(out_lo)


def _coupled_draws(image, rng, *, num_views, scale, ratio, flip, color_jitter):
  """Every random draw of `coupled_views` and `coupled_crops`, in one order
  for both, and the pixels they crop: `(pixels, [(box, flipped, jitter
  params)] per view)`. Several views share one full-scale decode of the
  whole image; a single view (RAML's mixup partners) decodes only its box,
  at full scale too (`decoded_crop`: the same pixels), its box then
  relative to that crop."""
  height, width = height_width(image)
  strengths = jitter_strengths(color_jitter)
  draws = []
  for _ in range(num_views):
    box = random_resized_crop_box(rng, height, width, scale=scale, ratio=ratio)
    flipped = flip and rng.random() < 0.5
    draws.append((box, flipped, color_jitter_params(rng, strengths)))
  if num_views != 1:
    return decoded_array(image, (width, height))[0], draws
  (left, top, w, h), flipped, params = draws[0]
  pixels, (x0, y0), _ = decoded_crop(image, (left, top, w, h), (width, height))
  return pixels, [((left - x0, top - y0, w, h), flipped, params)]


def coupled_crops(image, rng, *, num_views, hi, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                  flip=True, color_jitter=0.0, out=None):
  """What `coupled_views` draws, with only the `hi` crops rendered (flipped,
  not jittered): the device makes the rest (`device_augment.coupled_views`).

  The random draws are `coupled_views`'s (`_coupled_draws`), so both paths
  give one image the same boxes, flips and jitter. `out`: a uint8
  [num_views, hi, hi, 3] array the crops are rendered into (else a new one).

  Returns:
    `(crops uint8 [num_views, hi, hi, 3], order int32 [num_views, 4],
    factors float32 [num_views, 4])`; an op that is off has factor 1
    (hue: 0).
  """
  pixels, draws = _coupled_draws(image, rng, num_views=num_views, scale=scale, ratio=ratio,
                                 flip=flip, color_jitter=color_jitter)
  crops = np.empty((num_views, hi, hi, 3), np.uint8) if out is None else out
  orders, factors = [], []
  for view, (box, flipped, (order, f)) in enumerate(draws):
    crop_resize(pixels, box, hi, flip=flipped, out=crops[view])
    orders.append(order)
    factors.append([1.0 if x is None else x for x in f[:3]] + [f[3] or 0.0])
  return crops, np.asarray(orders, np.int32), np.asarray(factors, np.float32)


def blend(a, b, lam):
  """`lam * a + (1 - lam) * b` of uint8 images, rounded back to uint8 (mixup)."""
  mixed = lam * a.astype(np.float32) + (1.0 - lam) * b.astype(np.float32)
  return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
