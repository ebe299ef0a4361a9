"""Embedded sketch/photo data set, generated procedurally (no download).

Modelled on the Sketchy database: each *photo* is one instance of an object
category (its own geometry: aspect, part sizes, number of points; its own
pose: position, scale, rotation, mirror) rendered filled, shaded and textured
on a varied background; each *sketch* traces that same instance in the same
pose with jittery, partly dropped strokes of varying width under a slight
affine distortion, dark on white. Retrieving a sketch's own photo is therefore
learnable (geometry and pose carry over) but not trivial: the photos of a
category share a shape and differ only by instance geometry and pose.

Everything is drawn at twice the target size and downscaled (antialiasing).
Each photo has its own seed stream, ``(seed, category, instance)``, so a
photo does not change when other arguments (e.g. the number of photos) do.
"""
import hashlib
import io
import json
import os
import tempfile

import numpy as np

from jaxdml import extras
from jaxdml import paths
from jaxdml.config import defaults

_DEFAULTS = defaults.SYNTHETIC  # `generate`'s keywords, written once

# Bump when the rendering changes: it keys the on-disk cache.
GENERATOR_VERSION = 1

_TAU = 2 * np.pi


def _arc(cx, cy, rx, ry, a0=0.0, a1=_TAU, n=40):
  t = np.linspace(a0, a1, n, endpoint=False if a1 - a0 >= _TAU else True)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(x0, y0, x1, y1):
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


# Each category maps a Generator to parts: (kind, points, shade). `kind` is
# "fill" (closed polygon) or "line" (open stroke); `shade` picks a colour
# variant. Coordinates are y-down and get normalised afterwards.
def _star(r):
  n, inner = r.integers(5, 9), r.uniform(0.35, 0.6)
  t = np.arange(2 * n) * np.pi / n - np.pi / 2
  rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
  pts = np.stack([rad * np.cos(t) * r.uniform(0.8, 1.2), rad * np.sin(t)], 1)
  return [("fill", pts, 0)]


def _heart(r):
  t = np.linspace(0, _TAU, 60, endpoint=False)
  lobe, tip = r.uniform(3.5, 6.5), r.uniform(1.5, 3.0)
  x = 16 * np.sin(t) ** 3 * r.uniform(0.8, 1.25)
  y = -(13 * np.cos(t) - lobe * np.cos(2 * t) - tip * np.cos(3 * t) - np.cos(4 * t))
  return [("fill", np.stack([x, y], 1), 0)]


def _house(r):
  w, hb, hr, o = r.uniform(0.9, 1.6), r.uniform(0.6, 1.1), r.uniform(0.35, 0.9), r.uniform(0, 0.2)
  parts = [("fill", _rect(-w / 2, 0, w / 2, hb), 0),
           ("fill", np.array([[-w / 2 - o, 0], [w / 2 + o, 0], [r.uniform(-0.2, 0.2) * w, -hr]]), 1)]
  if r.random() < 0.5:  # chimney
    cx = r.uniform(0.1, 0.3) * w
    parts.insert(0, ("fill", _rect(cx, -hr * 0.9, cx + 0.12 * w, -0.05), 1))
  dw, dh, dx = r.uniform(0.15, 0.3) * w, r.uniform(0.35, 0.7) * hb, r.uniform(-0.3, 0.3) * w
  parts.append(("fill", _rect(dx - dw / 2, hb - dh, dx + dw / 2, hb), 2))
  for _ in range(r.integers(0, 3)):
    s, wx = r.uniform(0.1, 0.2) * w, r.choice([-1, 1]) * r.uniform(0.25, 0.38) * w
    parts.append(("fill", _rect(wx - s / 2, 0.2 * hb, wx + s / 2, 0.2 * hb + s), 3))
  return parts


def _tree(r):
  tw, th = r.uniform(0.12, 0.3), r.uniform(0.3, 0.8)
  parts = [("fill", _rect(-tw / 2, 0, tw / 2, th), 1)]
  if r.random() < 0.5:
    rx, ry = r.uniform(0.5, 0.9), r.uniform(0.5, 0.9)
    parts.append(("fill", _arc(0, 0.1 - ry, rx, ry, n=48), 0))
  else:
    n, h = r.integers(2, 5), r.uniform(0.4, 0.7)
    for k in range(n):
      wk, yk = r.uniform(0.5, 0.8) * (1 - 0.18 * k), 0.05 - k * h * 0.6
      parts.append(("fill", np.array([[-wk, yk], [wk, yk], [0, yk - h]]), 0))
  return parts


def _car(r):
  l, h, wr = r.uniform(1.6, 2.4), r.uniform(0.35, 0.55), r.uniform(0.17, 0.3)
  cw, cx, ch = r.uniform(0.4, 0.65) * l, r.uniform(-0.15, 0.15) * l, r.uniform(0.25, 0.45)
  sl = r.uniform(0.05, 0.25)
  cabin = np.array([[cx - cw / 2, 0], [cx + cw / 2, 0], [cx + cw / 2 - sl, -ch], [cx - cw / 2 + sl, -ch]])
  parts = [("fill", cabin, 1), ("fill", _rect(-l / 2, 0, l / 2, h), 0)]
  for s in (-1, 1):
    parts.append(("fill", _arc(s * (l / 2 - r.uniform(0.25, 0.45)), h, wr, wr, n=28), 2))
  return parts


def _fish(r):
  ry, ts, fs = r.uniform(0.3, 0.65), r.uniform(0.3, 0.6), r.uniform(0.15, 0.4)
  tail = np.array([[0.9, 0], [0.9 + ts, -ts * r.uniform(0.6, 1.2)], [0.9 + ts * 0.8, 0], [0.9 + ts, ts * r.uniform(0.6, 1.2)]])
  fx = r.uniform(-0.3, 0.2)
  fin = np.array([[fx - fs, -ry * 0.8], [fx + fs, -ry * 0.9], [fx, -ry - fs]])
  return [("fill", tail, 1), ("fill", fin, 1), ("fill", _arc(0, 0, 1, ry, n=48), 0),
          ("line", _arc(-0.6, -ry * 0.25, 0.08, 0.08, 0, _TAU + 0.3, n=12), 3)]


def _cup(r):
  wt, wb, h = r.uniform(0.7, 1.1), r.uniform(0.45, 0.9), r.uniform(0.8, 1.4)
  hy, hs = r.uniform(0.3, 0.5) * h, r.uniform(0.2, 0.35) * h
  t = np.linspace(-np.pi / 2, np.pi / 2, 16)
  outer = np.stack([wt / 2 - 0.05 + (hs + 0.12) * np.cos(t), hy + (hs + 0.12) * np.sin(t)], 1)
  inner = np.stack([wt / 2 - 0.05 + hs * np.cos(t[::-1]), hy + hs * np.sin(t[::-1])], 1)
  parts = [("fill", np.concatenate([outer, inner]), 1),
           ("fill", np.array([[-wt / 2, 0], [wt / 2, 0], [wb / 2, h], [-wb / 2, h]]), 0)]
  if r.random() < 0.5:
    parts.append(("fill", _arc(0, h, wt * r.uniform(0.7, 1.0), 0.08, n=32), 2))
  return parts


def _arrow(r):
  l, sw, hl, hw = r.uniform(1.4, 2.2), r.uniform(0.12, 0.3), r.uniform(0.4, 0.8), r.uniform(0.35, 0.7)
  tail = r.uniform(0, 0.25)
  pts = [[-l / 2 - tail, -sw], [l / 2, -sw], [l / 2, -hw], [l / 2 + hl, 0], [l / 2, hw],
         [l / 2, sw], [-l / 2 - tail, sw], [-l / 2, 0]]
  return [("fill", np.array(pts), 0)]


def _moon(r):
  d, rr = r.uniform(0.3, 0.7), r.uniform(0.78, 1.0)
  x = (d * d + 1 - rr * rr) / (2 * d)
  y = np.sqrt(max(1 - x * x, 1e-6))
  th, ph = np.arctan2(y, x), np.arctan2(y, x - d)
  a = np.linspace(th, _TAU - th, 40)
  b = np.linspace(_TAU - ph, ph, 30)
  pts = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([d + rr * np.cos(b), rr * np.sin(b)], 1)])
  return [("fill", pts, 0)]


def _cross(r):
  a, b, c = r.uniform(0.12, 0.3), r.uniform(0.12, 0.3), r.uniform(-0.45, 0.1)
  lx, rx = r.uniform(0.5, 0.9), r.uniform(0.5, 0.9)
  pts = [(-a, -1), (a, -1), (a, c - b), (rx, c - b), (rx, c + b), (a, c + b), (a, 1), (-a, 1),
         (-a, c + b), (-lx, c + b), (-lx, c - b), (-a, c - b)]
  return [("fill", np.array(pts, float), 0)]


def _flower(r):
  n, pl, pw = r.integers(4, 9), r.uniform(0.35, 0.6), r.uniform(0.12, 0.25)
  stem = r.uniform(0.6, 1.2)
  parts = [("line", np.array([[0, 0], [r.uniform(-0.2, 0.2), stem * 0.5], [0, stem]]), 2)]
  off = r.uniform(0, _TAU)
  for k in range(n):
    a = off + k * _TAU / n
    e = _arc(pl * 0.75, 0, pl * 0.6, pw, n=20)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    parts.append(("fill", e @ rot.T, 0))
  parts.append(("fill", _arc(0, 0, 0.18, 0.18, n=24), 1))
  return parts


def _umbrella(r):
  rx, ry, n = r.uniform(0.9, 1.2), r.uniform(0.45, 0.8), r.integers(3, 7)
  top = _arc(0, 0, rx, ry, np.pi, _TAU, n=40)
  xs = np.linspace(rx, -rx, n + 1)
  sc = np.concatenate([_arc((xs[k] + xs[k + 1]) / 2, 0, (xs[k] - xs[k + 1]) / 2, 0.12, 0, -np.pi, n=8)
                       for k in range(n)])
  hl, hk = r.uniform(0.7, 1.1), r.uniform(0.1, 0.22)
  hook = _arc(-hk, hl, hk, hk, 0, np.pi, n=10)
  return [("fill", np.concatenate([top, sc]), 0),
          ("line", np.concatenate([[[0, -ry], [0, hl]], hook]), 2)]


def _boat(r):
  hw, hb, hh = r.uniform(0.9, 1.3), r.uniform(0.5, 0.9), r.uniform(0.25, 0.45)
  mh, mx = r.uniform(0.9, 1.5), r.uniform(-0.2, 0.2)
  parts = [("line", np.array([[mx, 0], [mx, -mh]]), 2),
           ("fill", np.array([[-hw, 0], [hw, 0], [hb * 0.8, hh], [-hb * 0.8, hh]]), 1),
           ("fill", np.array([[mx + 0.05, -mh * 0.95], [mx + 0.05, -0.08], [mx + r.uniform(0.5, 0.9), -0.08]]), 0)]
  if r.random() < 0.5:
    parts.append(("fill", np.array([[mx - 0.05, -mh * 0.8], [mx - 0.05, -0.08], [mx - r.uniform(0.3, 0.7), -0.08]]), 0))
  return parts


def _lightning(r):
  pts = np.array([[-0.2, -1], [0.5, -1], [0.1, -0.15], [0.5, -0.15], [-0.4, 1], [0, 0.1], [-0.45, 0.1]])
  pts = pts + r.normal(0, 0.07, pts.shape)
  pts[:, 0] *= r.uniform(0.7, 1.3)
  return [("fill", pts, 0)]


def _mushroom(r):
  rx, ry, sw, sh = r.uniform(0.8, 1.2), r.uniform(0.4, 0.8), r.uniform(0.2, 0.45), r.uniform(0.5, 1.0)
  parts = [("fill", _rect(-sw / 2, -0.05, sw / 2, sh), 1), ("fill", _arc(0, 0, rx, ry, np.pi, _TAU, n=40), 0)]
  for _ in range(r.integers(0, 5)):
    a, q = r.uniform(np.pi + 0.4, _TAU - 0.4), r.uniform(0.3, 0.7)
    s = r.uniform(0.06, 0.14)
    parts.append(("fill", _arc(q * rx * np.cos(a), q * ry * np.sin(a), s, s, n=12), 3))
  return parts


def _kite(r):
  w, h1, h2, cx = r.uniform(0.5, 0.8), r.uniform(0.4, 0.7), r.uniform(0.8, 1.2), r.uniform(-0.1, 0.1)
  kite = np.array([[cx, -h1], [w, 0], [cx, h2], [-w, 0]])
  t = np.linspace(0, 1, 16)
  tail = np.stack([cx + r.uniform(0.2, 0.5) * np.sin(t * r.uniform(4, 9)), h2 + t * r.uniform(0.6, 1.0)], 1)
  return [("fill", kite, 0), ("line", np.array([[cx, -h1], [cx, h2]]), 2),
          ("line", np.array([[-w, 0], [w, 0]]), 2), ("line", tail, 2)]


CATEGORIES = {
    "star": _star, "heart": _heart, "house": _house, "tree": _tree, "car": _car,
    "fish": _fish, "cup": _cup, "arrow": _arrow, "moon": _moon, "cross": _cross,
    "flower": _flower, "umbrella": _umbrella, "boat": _boat, "lightning": _lightning,
    "mushroom": _mushroom, "kite": _kite,
}
CATEGORY_NAMES = tuple(CATEGORIES)


def _instance(category, rng):
  """Geometry in [-1, 1] (largest side spans 2) plus a pose, as a 2x3 affine."""
  parts = CATEGORIES[category](rng)
  pts = np.concatenate([p for _, p, _ in parts])
  lo, hi = pts.min(0), pts.max(0)
  centre, half = (lo + hi) / 2, (hi - lo).max() / 2
  parts = [(k, (p - centre) / half, s) for k, p, s in parts]
  scale = rng.uniform(0.5, 0.82)
  angle = rng.uniform(-0.6, 0.6)
  mirror = rng.choice([-1.0, 1.0])
  c, s = np.cos(angle), np.sin(angle)
  lin = scale * np.array([[c, -s], [s, c]]) @ np.diag([mirror, 1.0])
  shift = rng.uniform(-1, 1, 2) * (1 - scale * 0.95)
  return parts, np.concatenate([lin, shift[:, None]], 1)


def _apply(affine, pts, size):
  """Unit coordinates [-1, 1] -> pixel coordinates of a `size` canvas."""
  xy = pts @ affine[:, :2].T + affine[:, 2]
  return (xy + 1) * (size / 2)


def _hsv(h, s, v):
  Image = extras.require("PIL.Image", "the embedded sketch/photo data set")
  return np.array(Image.new("HSV", (1, 1), (int(h * 255) % 256, int(s * 255), int(v * 255))).convert("RGB").getpixel((0, 0)), float)


def _field(rng, size, kind):
  """A [size, size] multiplicative texture around 1."""
  Image = extras.require("PIL.Image", "the embedded sketch/photo data set")
  yy, xx = np.mgrid[0:size, 0:size] / size
  a = rng.uniform(0, _TAU)
  u = xx * np.cos(a) + yy * np.sin(a)
  if kind == 0:  # smooth shading
    return 0.75 + 0.5 * u
  if kind == 1:  # stripes
    return 1 + rng.uniform(0.2, 0.4) * np.sign(np.sin(u * _TAU * rng.uniform(4, 9)))
  if kind == 2:  # dots
    p = rng.uniform(0.08, 0.16)
    d = np.hypot((xx % p) / p - 0.5, (yy % p) / p - 0.5)
    return 1 - rng.uniform(0.3, 0.5) * (d < rng.uniform(0.2, 0.35))
  noise = rng.normal(0, 1, (6, 6))  # blotchy noise
  up = np.asarray(Image.fromarray(noise.astype(np.float32)).resize((size, size), Image.BICUBIC))
  return 1 + 0.2 * up


def _photo(parts, affine, rng, size):
  Image = extras.require("PIL.Image", "the embedded sketch/photo data set")
  ImageDraw = extras.require("PIL.ImageDraw", "the embedded sketch/photo data set")
  big = 2 * size
  hue = rng.random()
  obj_v = rng.uniform(0.55, 0.95)
  # Background value far from the object's so the object stays visible.
  bg_v = np.clip(obj_v + rng.choice([-1, 1]) * rng.uniform(0.3, 0.5), 0.2, 1.0)
  if abs(bg_v - obj_v) < 0.25:
    bg_v = obj_v - 0.35 if obj_v > 0.6 else obj_v + 0.35
  c0 = _hsv(rng.random(), rng.uniform(0, 0.5), bg_v)
  c1 = _hsv(rng.random(), rng.uniform(0, 0.5), np.clip(bg_v + rng.uniform(-0.15, 0.15), 0, 1))
  mix = _field(rng, big, int(rng.choice([0, 1, 3])))[..., None] - 0.5
  img = c0 + (c1 - c0) * np.clip(mix, 0, 1) + rng.normal(0, 5, (big, big, 3))
  tex_kind = int(rng.integers(0, 4))
  tex = _field(rng, big, tex_kind)[..., None] * _field(rng, big, 0)[..., None]
  shades = [(hue, rng.uniform(0.5, 0.95), obj_v)]
  for _ in range(3):
    shades.append(((hue + rng.uniform(0.15, 0.85)) % 1, rng.uniform(0.3, 0.9), np.clip(obj_v + rng.uniform(-0.35, 0.1), 0.1, 1)))
  lw = max(2, big // 32)
  for kind, pts, shade in parts:
    mask = Image.new("L", (big, big))
    xy = [tuple(p) for p in _apply(affine, pts, big)]
    draw = ImageDraw.Draw(mask)
    if kind == "fill":
      draw.polygon(xy, fill=255)
    else:
      draw.line(xy, fill=255, width=lw, joint="curve")
    m = np.asarray(mask, np.float32)[..., None] / 255
    colour = _hsv(*shades[shade]) * (tex if kind == "fill" else 0.6)
    img = img * (1 - m) + colour * m
  out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  return np.asarray(out.resize((size, size), Image.LANCZOS))


def _smooth_noise(rng, n, amp):
  k = max(3, n // 6)
  raw = rng.normal(0, 1, n + k)
  sm = np.convolve(raw, np.ones(k) / np.sqrt(k), "valid")[:n]
  return amp * sm


def _sketch(parts, affine, rng, size, drop=0.15):
  Image = extras.require("PIL.Image", "the embedded sketch/photo data set")
  ImageDraw = extras.require("PIL.ImageDraw", "the embedded sketch/photo data set")
  big = 2 * size
  # Slight affine distortion of the photo's pose: the drawer's imprecision.
  distort = np.eye(2) + rng.normal(0, 0.06, (2, 2))
  lin = distort @ affine[:, :2]
  aff = np.concatenate([lin, (affine[:, 2] + rng.normal(0, 0.04, 2))[:, None]], 1)
  canvas = Image.new("L", (big, big), 255)
  draw = ImageDraw.Draw(canvas)
  width = max(2, int(round(rng.uniform(1.0, 3.2) * big / 128)))
  ink = int(rng.uniform(0, 90))
  strokes = []
  for kind, pts, _ in parts:
    p = _apply(aff, np.concatenate([pts, pts[:1]]) if kind == "fill" else pts, big)
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    arc = np.concatenate([[0], np.cumsum(seg)])
    if arc[-1] < 1:
      continue
    n = max(4, int(arc[-1] / (big / 48)))
    s = np.linspace(0, arc[-1], n)
    p = np.stack([np.interp(s, arc, p[:, 0]), np.interp(s, arc, p[:, 1])], 1)
    p = p + np.stack([_smooth_noise(rng, n, big / 140), _smooth_noise(rng, n, big / 140)], 1)
    cuts = np.sort(rng.choice(np.arange(2, n - 1), size=min(int(rng.integers(0, 3)), n - 3), replace=False)) if n > 4 else []
    for piece in np.split(np.arange(n), cuts):
      if len(piece) >= 2:
        # Pieces overlap by a point so undropped neighbours join up.
        strokes.append(p[piece[0]:piece[-1] + 2])
  keep = rng.random(len(strokes)) >= drop
  # Drawers skip bits, not most of the object: restore dropped strokes (in a
  # random order) until at least 70% of the outline length is drawn.
  length = np.array([np.linalg.norm(np.diff(st, axis=0), axis=1).sum() for st in strokes])
  for i in rng.permutation(len(strokes)):
    if length[keep].sum() >= 0.7 * length.sum():
      break
    keep[i] = True
  for st, k in zip(strokes, keep):
    if k:
      draw.line([tuple(q) for q in st], fill=ink, width=width, joint="curve")
  gray = np.asarray(canvas.resize((size, size), Image.LANCZOS))
  return np.repeat(gray[..., None], 3, axis=2)


def generate(*, num_categories=_DEFAULTS["num_categories"],
             photos_per_category=_DEFAULTS["photos_per_category"],
             sketches_per_photo=_DEFAULTS["sketches_per_photo"],
             test_photos_per_category=_DEFAULTS["test_photos_per_category"],
             image_size=_DEFAULTS["image_size"], seed=_DEFAULTS["seed"]):
  """Generates the embedded sketch/photo set.

  Photos are ordered by category, then instance; the last
  `test_photos_per_category` photos of each category form the test split.
  Sketches are ordered by photo (`sketches_per_photo` consecutive rows each).

  Returns:
    dict of numpy arrays: `photos` uint8 [P, H, W, 3], `photo_category`
    int32 [P], `photo_split` int8 [P] (0 train, 1 test), `sketches` uint8
    [S, H, W, 3], `sketch_photo` int32 [S] (row of its photo),
    `sketch_category` int32 [S].
  """
  if not 1 <= num_categories <= len(CATEGORY_NAMES):
    raise ValueError(f"num_categories must be in [1, {len(CATEGORY_NAMES)}] "
                     f"(the generator knows {CATEGORY_NAMES}); got {num_categories}.")
  if not 0 <= test_photos_per_category < photos_per_category:
    raise ValueError("test_photos_per_category must be in [0, photos_per_category); "
                     f"got {test_photos_per_category} with photos_per_category={photos_per_category}.")
  if sketches_per_photo < 1 or image_size < 8:
    raise ValueError(f"need sketches_per_photo >= 1 and image_size >= 8; got "
                     f"{sketches_per_photo}, {image_size}.")
  photos, cats, splits, sketches, sk_photo = [], [], [], [], []
  for c, name in enumerate(CATEGORY_NAMES[:num_categories]):
    for i in range(photos_per_category):
      parts, affine = _instance(name, np.random.default_rng([seed, c, i, 0]))
      photos.append(_photo(parts, affine, np.random.default_rng([seed, c, i, 1]), image_size))
      cats.append(c)
      splits.append(int(i >= photos_per_category - test_photos_per_category))
      for j in range(sketches_per_photo):
        sketches.append(_sketch(parts, affine, np.random.default_rng([seed, c, i, 2 + j]), image_size))
        sk_photo.append(len(photos) - 1)
  cats, sk_photo = np.asarray(cats, np.int32), np.asarray(sk_photo, np.int32)
  return {"photos": np.stack(photos), "photo_category": cats,
          "photo_split": np.asarray(splits, np.int8), "sketches": np.stack(sketches),
          "sketch_photo": sk_photo, "sketch_category": cats[sk_photo]}


def default_cache_dir():
  """`$JAXDML_CACHE/synthetic` (a local path or a URL), else
  `~/.cache/jaxdml/synthetic`."""
  root = os.environ.get("JAXDML_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdml")
  return paths.join(root, "synthetic")


def load_or_generate(cache_dir=None, **kwargs):
  """`generate(**kwargs)`, cached as an .npz keyed by the arguments and version.

  The file is written to a temporary name and renamed, so concurrent runs
  (several hosts, several tests) never read a half-written cache.
  """
  import inspect  # pylint: disable=g-import-not-at-top
  params = {k: v.default for k, v in inspect.signature(generate).parameters.items()}
  unknown = set(kwargs) - set(params)
  if unknown:
    raise TypeError(f"unknown synthetic data arguments {sorted(unknown)}; known: {sorted(params)}.")
  params.update(kwargs)
  key = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache_dir = cache_dir or default_cache_dir()
  name = f"sketchy_v{GENERATOR_VERSION}_{digest}.npz"
  if paths.is_url(cache_dir):  # one object upload: readers see all of it or nothing
    cached = paths.as_path(cache_dir) / name
    if cached.exists():
      with np.load(io.BytesIO(cached.read_bytes())) as f:
        return {k: f[k] for k in f.files}
    data = generate(**params)
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(buffer.getvalue())
    return data
  path = os.path.join(cache_dir, name)
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  data = generate(**params)
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return data


def sample_sheet(data, *, photos_per_row=2, max_rows=16):
  """A grid image: per category one row of photos, each followed by its sketches."""
  rows = []
  for c in np.unique(data["photo_category"])[:max_rows]:
    row = []
    for p in np.flatnonzero(data["photo_category"] == c)[:photos_per_row]:
      row += [data["photos"][p], *data["sketches"][data["sketch_photo"] == p]]
    rows.append(np.concatenate(row, axis=1))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  return np.concatenate(rows, axis=0)
