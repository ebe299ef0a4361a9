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

On several processes (a pod) every process holds the same numpy query and
gallery; each puts only its own devices' shards on them
(`jax.make_array_from_callback`): `jax.device_put` of a numpy array onto a
multi-process sharding would first check, with a cross-process gather of
the whole array, that every process passed the same value.
"""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SIMILARITIES = ("cosine", "dot", "euclidean")
# Elements of the [block, tile] score matrix per device: 64 MiB of float32.
_SCORE_BUDGET = 1 << 24
_MAX_TILE = 8192
_INDEX_PAD = np.iinfo(np.int32).max


def prepare(x, similarity):
  """float32 copy; rows L2-normalised for cosine (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  if similarity == "cosine":
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return x


def _round_up(x, m):
  return -(-x // m) * m


def _device_topk(q, q_start, g, g_sq, *, k, similarity, exclude_self,
                 num_valid):
  """Running top-k of one query block over this device's gallery tiles."""
  n_tiles, tile, _ = g.shape
  base = jax.lax.axis_index("data") * (n_tiles * tile)
  q_idx = q_start + jnp.arange(q.shape[0], dtype=jnp.int32)
  q_sq = jnp.sum(q * q, axis=1)
  kt = min(k, tile)

  def body(carry, xs):
    t, g_t, g_sq_t = xs
    s = jnp.dot(q, g_t.T, precision=jax.lax.Precision.HIGHEST)
    if similarity == "euclidean":
      # Negative squared distance, so that larger is better for every metric.
      s = jnp.minimum(2.0 * s - g_sq_t[None, :] - q_sq[:, None], 0.0)
    g_idx = base + t * tile + jnp.arange(tile, dtype=jnp.int32)
    invalid = jnp.broadcast_to(g_idx[None, :] >= num_valid, s.shape)
    if exclude_self:
      invalid |= g_idx[None, :] == q_idx[:, None]
    s = jnp.where(invalid, -jnp.inf, s)
    ts, ti = jax.lax.top_k(s, kt)
    # Carry first: it holds lower gallery indices, which must win ties.
    cs = jnp.concatenate([carry[0], ts], axis=1)
    ci = jnp.concatenate([carry[1], g_idx[ti]], axis=1)
    ns, pos = jax.lax.top_k(cs, k)
    return (ns, jnp.take_along_axis(ci, pos, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
          jnp.full((q.shape[0], k), _INDEX_PAD, jnp.int32))
  tiles = jnp.arange(n_tiles, dtype=jnp.int32)
  (s, i), _ = jax.lax.scan(body, init, (tiles, g, g_sq))
  return s, i


@functools.lru_cache(maxsize=32)
def _build(mesh, k, similarity, exclude_self, num_valid):
  local = functools.partial(_device_topk, k=k, similarity=similarity,
                            exclude_self=exclude_self, num_valid=num_valid)
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(None, "data"), P(None, "data")), check_vma=False)

  def fn(q, q_start, g, g_sq):
    s, i = sharded(q, q_start, g, g_sq)
    # Device d's list sits at columns [d*k, (d+1)*k) and covers lower gallery
    # indices than device d+1's, so top_k's tie rule keeps the index order.
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)

  # Replicated results: every process reads its own copy (`_fetch`).
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, out_shardings=(replicated, replicated))


def default_mesh():
  """A 1-D mesh named ``data`` over this process's devices."""
  return Mesh(np.array(jax.local_devices()), ("data",))


def search_blocks(query, gallery, k, *, exclude_self=False,
                  similarity="cosine", mesh=None, block_size=None):
  """Yields ``(start, scores [b, k], indices [b, k])`` per query block.

  Arguments as ``search``; ``block_size`` overrides the number of queries
  per block (default: a [block, tile] score matrix of ~16M elements).
  Results come back as numpy; the next block is dispatched before the
  current one is pulled to the host, so host and device work overlap.
  """
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}; choose from {SIMILARITIES}.")
  mesh = default_mesh() if mesh is None else mesh
  if mesh.axis_names != ("data",):
    raise ValueError(f"Exact search needs a 1-D mesh with axis 'data', got "
                     f"axes {mesh.axis_names}.")
  q = prepare(query, similarity)
  g = prepare(gallery, similarity)
  num_q, num_g = q.shape[0], g.shape[0]
  ndev = mesh.devices.size
  # Tiles split the gallery evenly over devices, so little is padding.
  tile = min(_MAX_TILE, _round_up(-(-num_g // ndev), 256))
  n_tiles = _round_up(num_g, ndev * tile) // (ndev * tile)
  padded = np.zeros((ndev * n_tiles * tile, g.shape[1]), np.float32)
  padded[:num_g] = g
  padded = padded.reshape(ndev * n_tiles, tile, g.shape[1])
  g_sq = np.sum(padded * padded, axis=2)
  gallery_sharding = NamedSharding(mesh, P("data"))
  g_dev = _local_shards(padded, gallery_sharding)
  g_sq_dev = _local_shards(g_sq, gallery_sharding)
  fn = _build(mesh, int(k), similarity, bool(exclude_self), num_g)
  # The carry is [block, k] too: a deep k (full ranking for mAP) shrinks it.
  block = block_size or max(8, min(_SCORE_BUDGET // max(tile, k), 4096))
  block = min(block, _round_up(num_q, 8))
  replicated = NamedSharding(mesh, P())

  def dispatch(start):
    qb = q[start:start + block]
    if qb.shape[0] < block:
      qb = np.concatenate([qb, np.zeros((block - qb.shape[0], q.shape[1]),
                                        np.float32)])
    return start, fn(_local_shards(qb, replicated), np.int32(start), g_dev, g_sq_dev)

  pending = collections.deque()
  for start in range(0, num_q, block):
    pending.append(dispatch(start))
    if len(pending) > 1:
      yield _fetch(*pending.popleft(), num_q)
  while pending:
    yield _fetch(*pending.popleft(), num_q)


def _local_shards(array: np.ndarray, sharding) -> jax.Array:
  """`array` on `sharding`, each process placing its own devices' shards."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _fetch(start, result, num_q):
  # Replicated results: this process's copy, no gather.
  s, i = (np.asarray(x.addressable_data(0)) for x in result)
  n = min(num_q - start, s.shape[0])
  return start, np.asarray(s[:n]), np.asarray(i[:n], np.int64)


def search(query, gallery, k, *, exclude_self=False, similarity="cosine",
           mesh=None):
  """Exact top-k; see ``jaxdml.retrieval.search`` for the arguments."""
  q_num = np.shape(query)[0]
  scores = np.empty((q_num, k), np.float32)
  indices = np.empty((q_num, k), np.int64)
  for start, s, i in search_blocks(query, gallery, k,
                                   exclude_self=exclude_self,
                                   similarity=similarity, mesh=mesh):
    scores[start:start + len(s)] = s
    indices[start:start + len(s)] = i
  return scores, indices
