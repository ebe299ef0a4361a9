"""A PNG of queries and their top-k results, hits framed green, misses red
(neutral frames where there are no labels to judge them by, as at search time)."""
from __future__ import annotations

import io

import numpy as np
from numpy.typing import ArrayLike

from jaxdml import extras
from jaxdml import paths

GREEN = (0, 200, 0)
RED = (220, 0, 0)
QUERY_FRAME = (128, 128, 128)
NEUTRAL = (70, 110, 180)  # a result nobody labelled: neither hit nor miss
BACKGROUND = (255, 255, 255)
GAP = 4         # pixels between tiles
QUERY_GAP = 16  # extra space between the query column and its results


def frame_width(tile: int) -> int:
  """Width in pixels of the coloured frame around a `tile`-pixel image."""
  return max(2, tile // 16)


def grid_size(num_rows: int, k: int, tile: int) -> tuple[int, int]:
  """(width, height) in pixels of a grid of ``num_rows`` queries x top-k."""
  width = GAP + (tile + GAP) * (k + 1) + QUERY_GAP
  height = GAP + (tile + GAP) * num_rows
  return width, height


def _as_rgb_uint8(name, images):
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8, got {images.dtype}; convert "
                     "float images in [0, 1] with (x * 255).round()"
                     ".astype(np.uint8), and undo any mean/std normalisation "
                     "first.")
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim == 3:
    images = np.repeat(images[..., None], 3, axis=-1)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} must be [N, H, W, 3], [N, H, W, 1] or [N, H, W],"
                     f" got shape {images.shape}.")
  return images


def _tile(image, tile, colour):
  """The image resized into a tile, inside a frame of ``colour``."""
  Image = extras.require("PIL.Image", "the retrieval picture")
  fw = frame_width(tile)
  inner = Image.fromarray(image).resize((tile - 2 * fw, tile - 2 * fw),
                                        Image.BILINEAR)
  out = Image.new("RGB", (tile, tile), colour)
  out.paste(inner, (fw, fw))
  return out


def save_retrieval_grid(path: str, query_images: ArrayLike, gallery_images: ArrayLike,
                        indices: ArrayLike, hits: ArrayLike | None, *, max_queries: int = 8,
                        tile: int = 96) -> str:
  """Writes a PNG grid: each row a query, then its top-k gallery results.

  Args:
    path: output file; parent folders are created.
    query_images: uint8 [Q, H, W, 3] (or grayscale [Q, H, W] / [..., 1]).
    gallery_images: uint8 [G, H', W', 3] or grayscale; sizes may differ from
      the queries' (sketch vs photo): every image is resized to the tile.
    indices: int [Q, k] gallery indices, best first (from ``search``).
    hits: bool [Q, k], True where the result is correct (green frame),
      False where wrong (red frame); None (no labels, e.g. `jaxdml.search`)
      frames every result in NEUTRAL blue. The query gets a grey frame.
    max_queries: rows drawn: the first ``max_queries`` queries.
    tile: side of each square tile in pixels.

  Returns:
    ``path``. The picture measures ``grid_size(rows, k, tile)``.
  """
  Image = extras.require("PIL.Image", "the retrieval picture")
  query_images = _as_rgb_uint8("query_images", query_images)
  gallery_images = _as_rgb_uint8("gallery_images", gallery_images)
  indices = np.asarray(indices)
  labelled = hits is not None
  hits = np.asarray(hits, bool) if labelled else np.zeros(indices.shape, bool)
  if indices.ndim != 2 or hits.shape != indices.shape:
    raise ValueError(f"indices and hits must both be [Q, k], got "
                     f"{indices.shape} and {hits.shape}.")
  if indices.shape[0] > query_images.shape[0]:
    raise ValueError(f"indices has {indices.shape[0]} rows but only "
                     f"{query_images.shape[0]} query images were given.")
  if indices.size and (indices.min() < 0 or
                       indices.max() >= gallery_images.shape[0]):
    raise ValueError("indices point outside gallery_images (valid range "
                     f"[0, {gallery_images.shape[0]})).")
  if tile < 8 or max_queries < 1:
    raise ValueError(f"Need tile >= 8 and max_queries >= 1, got {tile}, "
                     f"{max_queries}.")
  rows = min(max_queries, indices.shape[0])
  k = indices.shape[1]
  canvas = Image.new("RGB", grid_size(rows, k, tile), BACKGROUND)
  for r in range(rows):
    y = GAP + r * (tile + GAP)
    canvas.paste(_tile(query_images[r], tile, QUERY_FRAME), (GAP, y))
    for c in range(k):
      x = GAP + (c + 1) * (tile + GAP) + QUERY_GAP
      colour = (GREEN if hits[r, c] else RED) if labelled else NEUTRAL
      canvas.paste(_tile(gallery_images[indices[r, c]], tile, colour), (x, y))
  target = paths.as_path(path)  # local or a URL
  target.parent.mkdir(parents=True, exist_ok=True)
  png = io.BytesIO()
  canvas.save(png, format="PNG")
  target.write_bytes(png.getvalue())
  return path
