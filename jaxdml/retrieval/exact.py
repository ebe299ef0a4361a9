"""Exact k-nearest-neighbour search in JAX with bounded memory.

Queries are streamed in blocks; the gallery is split into fixed-size tiles
sharded over the devices of a 1-D mesh. Each device keeps a running top-k over
its tiles (``lax.scan``), and the per-device lists are merged with one more
``top_k``. The largest intermediate is a [block, tile] score matrix per
device, never [Q, G], so a 120k x 120k x 512 evaluation fits in a few GiB.

Ties: the order is (score descending, gallery index ascending). ``lax.top_k``
puts the lower position first on ties, and every merge concatenates the
candidates in gallery-index order, so the lower gallery index wins at every
stage. Each score is one row-by-row dot product, so 1 or 8 devices give the
same scores and indices (tested on CPU; the tile width follows the device
count, to keep padding low).

`first_hit_ranks` finds how deep each query's first relevant item lies in
the whole ranking with the same tiles and tie rule, in two passes (the best
relevant score, then the items above it), for MRR at full depth.

On several processes (a pod) every process holds the same numpy query and
gallery; each puts only its own devices' shards on them
(`jax.make_array_from_callback`): `jax.device_put` of a numpy array onto a
multi-process sharding would first check, with a cross-process gather of
the whole array, that every process passed the same value.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from numpy.typing import ArrayLike

from jaxdml import sharding

SIMILARITIES = ("cosine", "dot", "euclidean")
# Elements of the [block, tile] score matrix per device: 64 MiB of float32
# (on CPU at SOP size 4M- and 8M-element blocks were no faster).
_SCORE_BUDGET = 1 << 24
_MAX_TILE = 8192
# Gallery items per chunk of `_chunked_top_k` (a tile is a multiple of it).
_CHUNK = 32
_INDEX_PAD = np.iinfo(np.int32).max


def prepare(x: ArrayLike, similarity: str) -> np.ndarray:
  """float32 copy; rows L2-normalised for cosine (zero rows stay zero).

  `x` [N, D] of any real dtype.
  """
  x = np.asarray(x, np.float32)
  if similarity == "cosine":
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return x


def scores_numpy(query: ArrayLike, gallery: ArrayLike, similarity: str) -> np.ndarray:
  """[Q, G] scores (larger is better) on the host: for a handful of queries.

  `query` [Q, D], `gallery` [G, D]; float32.
  """
  q, g = prepare(query, similarity), prepare(gallery, similarity)
  dot = q @ g.T
  if similarity != "euclidean":
    return dot
  return 2 * dot - np.sum(q * q, axis=1)[:, None] - np.sum(g * g, axis=1)[None, :]


def _round_up(x, m):
  return -(-x // m) * m


def _chunked_top_k(raw, score, k, chunk):
  """``top_k(score(raw), k)`` of a [block, tile] matrix, reading it ~once.

  ``score`` maps (raw values, gallery positions) to the scores to rank
  (metric and masks). The row is cut into chunks of ``chunk``; the k chunks
  with the largest maxima hold the top k (each better chunk holds a better
  item), ties included when equal maxima go to the lower chunk, as
  ``top_k`` does. Only the chunk maxima need ``score`` over the whole
  matrix, and XLA fuses it into that reduction, so the [block, tile]
  matrix is read once more after the matmul wrote it, never rewritten;
  ``lax.top_k`` over whole rows cost ~30 % on top of the matmul on CPU.
  """
  b, tile = raw.shape
  cols = jnp.arange(tile, dtype=jnp.int32)
  maxima = score(raw, cols[None, :]).reshape(b, tile // chunk, chunk).max(axis=2)
  _, best = jax.lax.top_k(maxima, k)
  # Chunks in gallery order, so that the last top_k's tie rule is the index.
  best = jnp.sort(best, axis=1)
  pos = (best[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(b, k * chunk)
  values, at = jax.lax.top_k(score(jnp.take_along_axis(raw, pos, axis=1), pos), k)
  return values, jnp.take_along_axis(pos, at, axis=1)


def _device_topk(q, q_start, num_valid, g, g_sq, *, k, similarity, exclude_self):
  """Running top-k of one query block over this device's gallery tiles."""
  n_tiles, tile, _ = g.shape
  base = jax.lax.axis_index("data") * (n_tiles * tile)
  q_idx = q_start + jnp.arange(q.shape[0], dtype=jnp.int32)
  q_sq = jnp.sum(q * q, axis=1)
  kt = min(k, tile)

  def body(carry, xs):
    t, g_t, g_sq_t = xs
    start = base + t * tile

    def score(raw, pos):
      """Scores of the raw dot products at tile positions `pos` [1 or b, n]."""
      s = raw
      if similarity == "euclidean":
        # Negative squared distance, so that larger is better for every metric.
        s = jnp.minimum(2.0 * s - g_sq_t[pos] - q_sq[:, None], 0.0)
      invalid = start + pos >= num_valid
      if exclude_self:
        invalid |= start + pos == q_idx[:, None]
      return jnp.where(invalid, -jnp.inf, s)

    raw = jnp.dot(q, g_t.T, precision=jax.lax.Precision.HIGHEST)
    if kt * _CHUNK * 2 <= tile:
      ts, ti = _chunked_top_k(raw, score, kt, _CHUNK)
    else:  # deep k (mAP ranks the whole gallery): chunks would not prune
      ts, ti = jax.lax.top_k(score(raw, jnp.arange(tile, dtype=jnp.int32)[None, :]), kt)
    # Carry first: it holds lower gallery indices, which must win ties.
    cs = jnp.concatenate([carry[0], ts], axis=1)
    ci = jnp.concatenate([carry[1], start + ti], axis=1)
    ns, pos = jax.lax.top_k(cs, k)
    return (ns, jnp.take_along_axis(ci, pos, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
          jnp.full((q.shape[0], k), _INDEX_PAD, jnp.int32))
  tiles = jnp.arange(n_tiles, dtype=jnp.int32)
  (s, i), _ = jax.lax.scan(body, init, (tiles, g, g_sq))
  return s, i


@functools.lru_cache(maxsize=32)
def _build(mesh, k, similarity, exclude_self):
  # The gallery's size is an argument, not a constant: a growing gallery
  # (`Index.add`) reuses the compiled search until its padded shape grows.
  local = functools.partial(_device_topk, k=k, similarity=similarity,
                            exclude_self=exclude_self)
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P(), P("data"), P("data")),
      out_specs=(P(None, "data"), P(None, "data")), check_vma=False)

  def fn(q, q_start, num_valid, g, g_sq):
    s, i = sharded(q, q_start, num_valid, g, g_sq)
    # Device d's list sits at columns [d*k, (d+1)*k) and covers lower gallery
    # indices than device d+1's, so top_k's tie rule keeps the index order.
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)

  # Replicated results: every process reads its own copy (`_fetch`).
  replicated = NamedSharding(mesh, P())
  return sharding.InContextMesh(mesh, jax.jit(fn, out_shardings=(replicated, replicated)))


def tiling(num_gallery: int, num_devices: int) -> tuple[int, int]:
  """``(tile, tiles per device)`` for a gallery sharded over the devices.

  Tiles split the gallery evenly over devices and tiles, so little is
  padding (60,502 items: 61,440 slots, where 8192-wide tiles had 65,536).
  """
  per_device = -(-num_gallery // num_devices)
  n_tiles = -(-per_device // _MAX_TILE)
  return _round_up(-(-per_device // n_tiles), 256), n_tiles


def query_block_size(num_gallery: int, k: int, num_devices: int) -> int:
  """Queries per block: a [block, tile] score matrix of ~4M elements."""
  tile, _ = tiling(num_gallery, num_devices)
  # The carry is [block, k] too: a deep k (full ranking for mAP) shrinks it.
  return max(8, min(_SCORE_BUDGET // max(tile, k), 4096))


def default_mesh() -> Mesh:
  """A 1-D mesh named ``data`` over this process's devices."""
  return Mesh(np.array(jax.local_devices()), ("data",))


def search_blocks(query: ArrayLike, gallery: ArrayLike, k: int, *, exclude_self: bool = False,
                  similarity: str = "cosine", mesh: Mesh | None = None,
                  block_size: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Yields ``(start, scores [b, k], indices [b, k])`` per query block.

  Arguments as ``search``; ``block_size`` overrides the number of queries
  per block (default: a [block, tile] score matrix of ~4M elements).
  Results come back as numpy; the next block is dispatched before the
  current one is pulled to the host, so host and device work overlap.

  Scores float32, indices int64.
  """
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}; choose from {SIMILARITIES}.")
  mesh = _check_mesh(mesh)
  q = prepare(query, similarity)
  num_q, num_g = q.shape[0], np.shape(gallery)[0]
  ndev = mesh.devices.size
  g_dev, g_sq_dev = _sharded_gallery(prepare(gallery, similarity), mesh)
  fn = _build(mesh, int(k), similarity, bool(exclude_self))
  block = min(block_size or query_block_size(num_g, k, ndev), _round_up(num_q, 8))
  replicated = NamedSharding(mesh, P())

  def dispatch(start):
    qb = q[start:start + block]
    if qb.shape[0] < block:
      qb = np.concatenate([qb, np.zeros((block - qb.shape[0], q.shape[1]),
                                        np.float32)])
    return start, fn(_local_shards(qb, replicated), np.int32(start), np.int32(num_g), g_dev,
                     g_sq_dev)

  pending = collections.deque()
  for start in range(0, num_q, block):
    pending.append(dispatch(start))
    if len(pending) > 1:
      yield _fetch(*pending.popleft(), num_q)
  while pending:
    yield _fetch(*pending.popleft(), num_q)


def _check_mesh(mesh):
  """The mesh as a 1-D Auto mesh (`sharding.auto_mesh`): the search places
  its own arrays and merges the devices' lists with a `top_k` across them,
  which Explicit axes would refuse."""
  mesh = default_mesh() if mesh is None else mesh
  if mesh.axis_names != ("data",):
    raise ValueError(f"Exact search needs a 1-D mesh with axis 'data', got "
                     f"axes {mesh.axis_names}.")
  return sharding.auto_mesh(mesh)


def _tiled(rows: np.ndarray, mesh, fill=0) -> np.ndarray:
  """[N, ...] rows padded and cut into [devices * tiles, tile, ...] (`tiling`)."""
  ndev = mesh.devices.size
  tile, n_tiles = tiling(rows.shape[0], ndev)
  padded = np.full((ndev * n_tiles * tile,) + rows.shape[1:], fill, rows.dtype)
  padded[:rows.shape[0]] = rows
  return padded.reshape((ndev * n_tiles, tile) + rows.shape[1:])


def _sharded_gallery(g: np.ndarray, mesh):
  """The prepared gallery's tiles and their squared norms, sharded over `data`."""
  padded = _tiled(g, mesh)
  g_sq = np.sum(padded * padded, axis=2)
  gallery_sharding = NamedSharding(mesh, P("data"))
  return _local_shards(padded, gallery_sharding), _local_shards(g_sq, gallery_sharding)


def _local_shards(array: np.ndarray, sharding) -> jax.Array:
  """`array` on `sharding`, each process placing its own devices' shards."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _fetch(start, result, num_q):
  # Replicated results: this process's copy, no gather.
  s, i = (np.asarray(x.addressable_data(0)) for x in result)
  n = min(num_q - start, s.shape[0])
  return start, np.asarray(s[:n]), np.asarray(i[:n], np.int64)


def search(query: ArrayLike, gallery: ArrayLike, k: int, *, exclude_self: bool = False,
           similarity: str = "cosine", mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k; see ``jaxdml.retrieval.search`` for the arguments.

  Returns `(scores float32 [Q, k], indices int64 [Q, k])`, best first.
  """
  q_num = np.shape(query)[0]
  scores = np.empty((q_num, k), np.float32)
  indices = np.empty((q_num, k), np.int64)
  for start, s, i in search_blocks(query, gallery, k,
                                   exclude_self=exclude_self,
                                   similarity=similarity, mesh=mesh):
    scores[start:start + len(s)] = s
    indices[start:start + len(s)] = i
  return scores, indices


# First hits at full depth: how deep a query's first relevant item lies in
# the whole ranking, without ranking the whole gallery (MRR at
# AccuracyCalculator's default depth, for the queries a top-k missed).

def _device_first_hit(q, q_code, q_self, g, g_sq, g_code, *, similarity, num_valid):
  """Best relevant item, then how many items rank above it, on this device's
  gallery tiles; both reduced over the mesh (`first_hit_ranks`)."""
  n_tiles, tile, _ = g.shape
  base = jax.lax.axis_index("data") * (n_tiles * tile)
  q_sq = jnp.sum(q * q, axis=1)

  def tile_scores(t):
    raw = jnp.dot(q, g[t].T, precision=jax.lax.Precision.HIGHEST)
    s = raw
    if similarity == "euclidean":  # as `_device_topk`, so that the ranks agree
      s = jnp.minimum(2.0 * raw - g_sq[t][None, :] - q_sq[:, None], 0.0)
    index = base + t * tile + jnp.arange(tile, dtype=jnp.int32)
    ok = (index < num_valid)[None, :] & (index[None, :] != q_self[:, None])
    return s, index, ok

  def best(carry, t):
    s, index, ok = tile_scores(t)
    relevant = jnp.where(ok & (g_code[t][None, :] == q_code[:, None]), s, -jnp.inf)
    tile_best = relevant.max(axis=1)
    tile_index = index[jnp.argmax(relevant, axis=1)]  # the first of equal scores
    # Strictly better only: on a tie the earlier tile (lower index) stays.
    better = tile_best > carry[0]
    return (jnp.where(better, tile_best, carry[0]), jnp.where(better, tile_index, carry[1])), None

  tiles = jnp.arange(n_tiles, dtype=jnp.int32)
  init = (jnp.full(q.shape[:1], -jnp.inf, jnp.float32),
          jnp.full(q.shape[:1], _INDEX_PAD, jnp.int32))
  (score, index), _ = jax.lax.scan(best, init, tiles)
  top = jax.lax.pmax(score, "data")
  first = jax.lax.pmin(jnp.where(score == top, index, _INDEX_PAD), "data")

  def above(count, t):
    s, idx, ok = tile_scores(t)
    ahead = (s > top[:, None]) | ((s == top[:, None]) & (idx[None, :] < first[:, None]))
    return count + jnp.sum(ok & ahead, axis=1, dtype=jnp.int32), None

  count, _ = jax.lax.scan(above, jnp.zeros(q.shape[:1], jnp.int32), tiles)
  count = jax.lax.psum(count, "data")
  return jnp.where(top > -jnp.inf, count + 1, 0)


@functools.lru_cache(maxsize=16)
def _build_first_hit(mesh, similarity, num_valid):
  local = functools.partial(_device_first_hit, similarity=similarity, num_valid=num_valid)
  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P(), P(), P(), P("data"), P("data"), P("data")),
                          out_specs=P(), check_vma=False)
  return sharding.InContextMesh(mesh, jax.jit(sharded, out_shardings=NamedSharding(mesh, P())))


def first_hit_ranks(query: ArrayLike, gallery: ArrayLike, query_labels: ArrayLike,
                    gallery_labels: ArrayLike, *, self_rows: ArrayLike | None = None,
                    similarity: str = "cosine", mesh: Mesh | None = None,
                    block_size: int | None = None) -> np.ndarray:
  """Rank of each query's first relevant gallery item in the whole ranking.

  The ranking is `search`'s at full depth (score descending, ties to the
  lower gallery index, row ``self_rows[i]`` left out for query i); an item is
  relevant when its label equals the query's. Per query block, one pass over
  the gallery tiles finds the best relevant item and a second counts the
  items ranked above it: memory stays at `search`'s [block, tile].

  Args:
    query: [Q, D] embeddings; gallery: [G, D].
    query_labels: [Q]; gallery_labels: [G] (any comparable dtype).
    self_rows: int [Q], each query's own gallery row (-1: none), or None.
    similarity, mesh: as in `search`.
    block_size: queries per block (default: as `search_blocks`).

  Returns:
    int64 [Q], 1-based; 0 where no gallery item is relevant.
  """
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}; choose from {SIMILARITIES}.")
  mesh = _check_mesh(mesh)
  num_q, num_g = np.shape(query)[0], np.shape(gallery)[0]
  # Labels as int32 codes, shared by both sides; -1 pads the gallery.
  _, codes = np.unique(np.concatenate([np.asarray(query_labels).reshape(-1),
                                       np.asarray(gallery_labels).reshape(-1)]),
                       return_inverse=True)
  codes = np.asarray(codes, np.int32).reshape(-1)
  q_codes, g_codes = codes[:num_q], codes[num_q:]
  self_rows = (np.full(num_q, -1, np.int32) if self_rows is None
               else np.asarray(self_rows, np.int32))
  q = prepare(query, similarity)
  g_dev, g_sq_dev = _sharded_gallery(prepare(gallery, similarity), mesh)
  g_code_dev = _local_shards(_tiled(g_codes, mesh, fill=-1), NamedSharding(mesh, P("data")))
  fn = _build_first_hit(mesh, similarity, num_g)
  block = min(block_size or query_block_size(num_g, 1, mesh.devices.size), _round_up(num_q, 8))
  replicated = NamedSharding(mesh, P())
  ranks = np.zeros(num_q, np.int64)
  for start in range(0, num_q, block):
    n = min(block, num_q - start)
    pad = lambda x, fill: np.concatenate([x, np.full((block - n,) + x.shape[1:], fill, x.dtype)])
    args = (pad(q[start:start + n], 0), pad(q_codes[start:start + n], -2),
            pad(self_rows[start:start + n], -1))
    out = fn(*(_local_shards(a, replicated) for a in args), g_dev, g_sq_dev, g_code_dev)
    ranks[start:start + n] = np.asarray(out.addressable_data(0))[:n]
  return ranks


def first_hit_ranks_numpy(query: ArrayLike, gallery: ArrayLike,
                          relevant_fn: Callable[[np.ndarray], np.ndarray], *,
                          self_rows: ArrayLike | None = None, similarity: str = "cosine",
                          block_size: int | None = None) -> np.ndarray:
  """`first_hit_ranks` on the host for any relevance: ``relevant_fn(rows)``
  gives bool [len(rows), G] for the query positions ``rows`` (a custom
  ``label_comparison_fn``). Scores in float32 numpy, as `scores_numpy`;
  memory [block, G]."""
  num_q, num_g = np.shape(query)[0], np.shape(gallery)[0]
  self_rows = np.full(num_q, -1) if self_rows is None else np.asarray(self_rows)
  block = block_size or max(1, _SCORE_BUDGET // max(num_g, 1))
  q, g = prepare(query, similarity), prepare(gallery, similarity)
  g_sq = np.sum(g * g, axis=1)
  index = np.arange(num_g)
  ranks = np.zeros(num_q, np.int64)
  for start in range(0, num_q, block):
    rows = np.arange(start, min(start + block, num_q))
    s = q[rows] @ g.T
    if similarity == "euclidean":
      s = np.minimum(2 * s - np.sum(q[rows] ** 2, axis=1)[:, None] - g_sq[None, :], 0.0)
    ok = index[None, :] != self_rows[rows][:, None]
    relevant = np.asarray(relevant_fn(rows), bool) & ok
    top = np.where(relevant, s, -np.inf).max(axis=1)
    first = np.where(relevant & (s == top[:, None]), index[None, :], num_g).min(axis=1)
    ahead = (s > top[:, None]) | ((s == top[:, None]) & (index[None, :] < first[:, None]))
    ranks[rows] = np.where(np.isfinite(top), np.sum(ok & ahead, axis=1) + 1, 0)
  return ranks
