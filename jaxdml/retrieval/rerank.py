"""Re-ranking of top-k search results: alpha-QE, DBA, k-reciprocal encoding.

    scores, indices = retrieval.search(q, g, k=100)
    scores, indices = rerank.alpha_qe(q, g, indices, n=2, alpha=3.0)

Every function takes the embeddings it needs and top-k neighbour lists as
`retrieval.search` returns them (exact or ScaNN alike) and returns a
re-ranked `(scores float32 [Q, k], indices int64 [Q, k])`, best first: each
query's row is a permutation of its candidates, so what the first search
missed stays missed and the cost stays bounded by the lists. Only the
lists' indices are read; scores are recomputed from the embeddings, so
approximate (ScaNN) or Euclidean first-stage scores do not leak in. Ties
keep the candidates' given order.

- `alpha_qe` (Radenovic, Tolias & Chum, TPAMI 2018): the query becomes
  normalise(q + sum_{i<=n} max(s_i, 0)^alpha d_i) over its top-n, and the
  candidates are re-scored by cosine similarity to it.
- `dba` (database-side augmentation, same weighting): each gallery item
  becomes normalise(g + sum over its top-k gallery neighbours), then the
  query's candidates are re-scored against the augmented items
  (`augment_database` returns them, e.g. for alpha-QE on top).
- `k_reciprocal` (Zhong et al., CVPR 2017; their `re_ranking(q_g_dist,
  q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)`): Jaccard distance of
  k-reciprocal neighbour encodings mixed with the original distance, over
  sparse encodings built from each item's own top-k list, never the
  [Q+G, Q+G] matrices the reference fills.

alpha-QE and DBA are jitted JAX (gathers and dot products, streamed in
query blocks); k-reciprocal sets are irregular, so that one is numpy and
scipy.sparse (scipy comes with JAX).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
import scipy.sparse

from jaxdml.retrieval import exact

NORMALIZATIONS = ("farthest", "list")
# Elements of a gathered [block, k, D] tile (16 MiB of float32).
_GATHER_BUDGET = 1 << 22


def _embeddings(name: str, x) -> np.ndarray:
  # Imported here: the package's __init__ may import this module first.
  from jaxdml.retrieval import _check_embeddings  # pylint: disable=g-import-not-at-top
  return _check_embeddings(name, x)


def _neighbour_ids(name: str, indices, rows: int, items: int) -> np.ndarray:
  """int64 [rows, k] indices into `items` things, or a ValueError."""
  indices = np.asarray(indices)
  if (indices.ndim != 2 or indices.shape[0] != rows
      or not np.issubdtype(indices.dtype, np.integer)):
    raise ValueError(f"{name} must be an integer [{rows}, k] array (the indices "
                     f"`retrieval.search` returns), got {indices.dtype} {indices.shape}.")
  if indices.size and (indices.min() < 0 or indices.max() >= items):
    raise ValueError(f"{name} holds indices outside [0, {items}) (ScaNN pads "
                     "missing neighbours with -1?): search with a smaller k.")
  return indices.astype(np.int64)


def _count(name: str, value, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  return int(value)


def _alpha(alpha) -> float:
  if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating))
      or not np.isfinite(alpha) or alpha < 0):
    raise ValueError(f"alpha must be a finite number >= 0 (the papers use 3), got {alpha!r}.")
  return float(alpha)


def _block_rows(k: int, dim: int, total: int) -> int:
  """Rows per block so that a [block, k, dim] gather stays within budget."""
  return int(max(8, min(_GATHER_BUDGET // max(1, k * dim), exact._round_up(total, 8))))


def _blocked(fn, rows: np.ndarray, other: np.ndarray, block: int):
  """`fn(rows[b], other[b])` over fixed-size blocks (one compile), results concatenated."""
  outs = []
  for start in range(0, len(rows), block):
    r, o = rows[start:start + block], other[start:start + block]
    pad = block - len(r)
    if pad:
      r = np.concatenate([r, np.zeros((pad,) + r.shape[1:], r.dtype)])
      o = np.concatenate([o, np.zeros((pad,) + o.shape[1:], o.dtype)])
    outs.append([np.asarray(x)[:block - pad] for x in fn(r, o)])
  return [np.concatenate(parts) for parts in zip(*outs)]


@jax.jit
def _expand(x, table, neighbours, alpha):
  """normalise(x + sum_i max(s_i, 0)^alpha table[n_i]): x [b, D] unit rows,
  table [N, D] unit rows, neighbours int [b, n]. A negative similarity gets
  weight 0 (0 ** 0 = 1 keeps alpha = 0 the plain average)."""
  d = table[neighbours]
  s = jnp.einsum("bd,bnd->bn", x, d, precision=jax.lax.Precision.HIGHEST)
  w = jnp.maximum(s, 0.0) ** alpha
  y = x + jnp.einsum("bn,bnd->bd", w, d, precision=jax.lax.Precision.HIGHEST)
  return y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-12)


@jax.jit
def _rescore(x, table, candidates):
  """Cosine scores of unit rows x [b, D] against table[candidates] [b, k],
  sorted best first (a stable sort: ties keep the given order)."""
  s = jnp.einsum("bd,bkd->bk", x, table[candidates], precision=jax.lax.Precision.HIGHEST)
  order = jnp.argsort(-s, axis=1, stable=True)
  return jnp.take_along_axis(s, order, 1), jnp.take_along_axis(candidates, order, 1)


def rescore(query: ArrayLike, gallery: ArrayLike,
            indices: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """Each query's candidates re-sorted by cosine similarity.

  Args:
    query: [Q, D]; gallery: [G, D] (both L2-normalised here).
    indices: int [Q, k] gallery indices, e.g. from `retrieval.search`.

  Returns:
    (scores float32 [Q, k], indices int64 [Q, k]), best first. Time
    O(Q k D), memory one [block, k, D] gather (16 MiB).
  """
  q = exact.prepare(_embeddings("query", query), "cosine")
  g = exact.prepare(_embeddings("gallery", gallery), "cosine")
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}.")
  idx = _neighbour_ids("indices", indices, len(q), len(g))
  table = jnp.asarray(g)
  fn = lambda rows, cand: _rescore(rows, table, cand)
  scores, order = _blocked(fn, q, idx, _block_rows(idx.shape[1], g.shape[1], len(q)))
  return scores.astype(np.float32), order.astype(np.int64)


def expand_queries(query: ArrayLike, gallery: ArrayLike, indices: ArrayLike, *, n: int = 2,
                   alpha: float = 3.0) -> np.ndarray:
  """alpha-QE query vectors: normalise(q + sum_{i<=n} max(s_i, 0)^alpha d_i).

  Args:
    query: [Q, D]; gallery: [G, D], both L2-normalised first (the method
      is defined on unit descriptors and cosine similarity s_i).
    indices: int [Q, k] gallery indices, best first; the first n are the
      expansion set (k >= n).
    n: neighbours added to each query; 0 leaves it as it is.
    alpha: similarity exponent (3 in the paper; 0 is plain average QE).

  Returns:
    float32 [Q, D], unit rows. Time O(Q n D).
  """
  q = exact.prepare(_embeddings("query", query), "cosine")
  g = exact.prepare(_embeddings("gallery", gallery), "cosine")
  n, alpha = _count("n", n), _alpha(alpha)
  idx = _neighbour_ids("indices", indices, len(q), len(g))
  if n > idx.shape[1]:
    raise ValueError(f"n={n} neighbours but indices has {idx.shape[1]} per query: "
                     f"search with k >= {n} or lower n.")
  table = jnp.asarray(g)
  fn = lambda rows, nbr: (_expand(rows, table, nbr, alpha),)
  (out,) = _blocked(fn, q, idx[:, :n], _block_rows(n, g.shape[1], len(q)))
  return out.astype(np.float32)


def alpha_qe(query: ArrayLike, gallery: ArrayLike, indices: ArrayLike, *, n: int = 2,
             alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """alpha-weighted query expansion, then the candidates re-scored.

  Arguments as `expand_queries`; `indices` [Q, k] are both the expansion
  set (first n) and the candidates re-ranked. With k = G this is the
  paper's second full search.

  Returns:
    (scores float32 [Q, k] = cosine(q', candidate), indices int64 [Q, k]),
    best first. Time O(Q (n + k) D); memory one [block, k, D] gather.
  """
  expanded = expand_queries(query, gallery, indices, n=n, alpha=alpha)
  return rescore(expanded, gallery, indices)


def augment_database(gallery: ArrayLike, gallery_indices: ArrayLike, *, k: int = 2,
                     alpha: float = 3.0) -> np.ndarray:
  """DBA: each gallery item becomes normalise(g + sum_{i<=k} max(s_i, 0)^alpha g_i).

  Args:
    gallery: [G, D], L2-normalised first.
    gallery_indices: int [G, kg], each item's own gallery neighbours best
      first (`retrieval.search(g, g, kg)`, with or without
      `exclude_self`): the item itself is skipped wherever it appears, and
      the first k others are added.
    k: neighbours per item; 0 leaves the gallery as it is.
    alpha: similarity exponent, as in alpha-QE.

  Returns:
    float32 [G, D], unit rows. Time O(G k D).
  """
  g = exact.prepare(_embeddings("gallery", gallery), "cosine")
  k, alpha = _count("k", k), _alpha(alpha)
  idx = _neighbour_ids("gallery_indices", gallery_indices, len(g), len(g))
  is_self = idx == np.arange(len(g))[:, None]
  others = idx.shape[1] - is_self.sum(1)
  if k > others.min(initial=k):
    raise ValueError(f"k={k} gallery neighbours but gallery_indices has only "
                     f"{others.min()} per item besides the item itself: search the "
                     f"gallery with k >= {k + 1} or lower k.")
  # The first k entries that are not the item itself, in the given order.
  keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
  nbr = np.take_along_axis(idx, keep, axis=1)
  table = jnp.asarray(g)
  fn = lambda rows, n_: (_expand(rows, table, n_, alpha),)
  (out,) = _blocked(fn, g, nbr, _block_rows(k, g.shape[1], len(g)))
  return out.astype(np.float32)


def dba(query: ArrayLike, gallery: ArrayLike, indices: ArrayLike, gallery_indices: ArrayLike, *,
        k: int = 2, alpha: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """Database-side augmentation, then the query's candidates re-scored.

  Args:
    query: [Q, D]; gallery: [G, D].
    indices: int [Q, kq] the query's candidates (gallery indices).
    gallery_indices, k, alpha: as in `augment_database`.

  Returns:
    (scores float32 [Q, kq] = cosine(q, augmented candidate), indices int64
    [Q, kq]), best first. Time O(G k D + Q kq D): the augmentation is the
    same for every query, so a service computes `augment_database` once and
    calls `rescore` (or indexes the augmented gallery).
  """
  return rescore(query, augment_database(gallery, gallery_indices, k=k, alpha=alpha),
                 indices)


def union_neighbors(query: ArrayLike, gallery: ArrayLike | None, depth: int,
                    **search_kwargs: Any) -> np.ndarray:
  """Each item's top-`depth` neighbours over `concat(query, gallery)`.

  What `k_reciprocal` wants as `neighbors` (the item itself included);
  `gallery=None` for the same-set protocol. `search_kwargs` go to
  `retrieval.search` (backend, similarity, mesh, ...). Costs one search of
  Q + G queries over Q + G items.

  `query` [Q, D], `gallery` [G, D] or None; int64 [Q + G, depth] ([Q, depth] for gallery=None).
  """
  from jaxdml import retrieval  # pylint: disable=g-import-not-at-top
  union = query if gallery is None else np.concatenate(
      [np.asarray(query, np.float32), np.asarray(gallery, np.float32)])
  depth = min(_count("depth", depth, 1), len(union))
  return retrieval.search(union, union, depth, **search_kwargs)[1]


def _squared_distances(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """float32 [M, c] ||x[rows] - x[cols]||^2, in blocks of bounded memory."""
  out = np.empty(cols.shape, np.float32)
  block = max(1, _GATHER_BUDGET // max(1, cols.shape[1] * x.shape[1]))
  for s in range(0, len(rows), block):
    diff = x[cols[s:s + block]] - x[rows[s:s + block], None, :]
    out[s:s + block] = np.einsum("bcd,bcd->bc", diff, diff)
  return out


def _farthest_squared(x: np.ndarray) -> np.ndarray:
  """float32 [N]: max_j ||x_i - x_j||^2 over all rows, by exact top-1 search.

  ||x_i - x_j||^2 = ||x_i||^2 + (||x_j||^2 - 2 x_i.x_j), and the bracket is
  the inner product of [-2 x_i, 1] with [x_j, ||x_j||^2]: the farthest item
  is the best one of a dot-product search, memory bounded like any search.
  """
  sq = np.einsum("nd,nd->n", x, x)
  ones = np.ones((len(x), 1), np.float32)
  scores, _ = exact.search(np.concatenate([-2.0 * x, ones], 1),
                           np.concatenate([x, sq[:, None]], 1), 1, similarity="dot")
  return np.maximum(sq + scores[:, 0], 0.0).astype(np.float32)


def _node_lists(x: np.ndarray, neighbors: np.ndarray, depth: int):
  """Each node's first `depth` neighbours by (distance, given order), itself first.

  Returns (lists int64 [N, depth], farthest listed squared distance [N]).
  """
  n = len(x)
  nodes = np.arange(n)
  cand = np.concatenate([nodes[:, None], neighbors], axis=1)
  d2 = _squared_distances(x, nodes, cand)
  listed_max = d2[:, 1:].max(axis=1, initial=0.0)
  again = np.zeros(cand.shape, bool)
  again[:, 1:] = neighbors == nodes[:, None]
  # Self first even before an exact duplicate; repeats of self dropped.
  d2[:, 0] = -1.0
  d2[again] = np.inf
  distinct = cand.shape[1] - again.sum(1)
  if distinct.min() < depth:
    raise ValueError(f"k_reciprocal needs each item's top {depth} (itself included: "
                     f"max(k1 + 1, k2)) but neighbors holds only {distinct.min()} for "
                     f"some rows: build it with union_neighbors(query, gallery, {depth}).")
  order = np.argsort(d2, axis=1, kind="stable")[:, :depth]
  return np.take_along_axis(cand, order, axis=1), listed_max


def _reciprocal_sets(lists: np.ndarray, k: int) -> np.ndarray:
  """int64 [N, k+1]: node i's forward top-(k+1) where i is in that
  neighbour's own top-(k+1) (the k-reciprocal set R(i, k)), else -1."""
  fwd = lists[:, :k + 1]
  out = np.empty_like(fwd)
  block = max(1, _GATHER_BUDGET // (fwd.shape[1] ** 2))
  for s in range(0, len(fwd), block):
    f = fwd[s:s + block]
    back = fwd[f]
    mine = np.arange(s, s + len(f))[:, None, None]
    out[s:s + block] = np.where((back == mine).any(axis=2), f, -1)
  return out


def _encodings(x, lists, scale, k1):
  """The k-reciprocal encodings V (sparse float32 [N, N], rows sum to 1).

  Row i is exp(-d^2(i, j) / scale_i) over R(i, k1) expanded by every
  R(c, round(k1 / 2)) (c in R(i, k1)) that shares more than 2/3 of its
  members with R(i, k1), normalised, as in the reference.
  """
  n = len(x)
  rec = _reciprocal_sets(lists, k1)
  half = _reciprocal_sets(lists, int(np.around(k1 / 2.0)))
  w1, w2 = rec.shape[1], half.shape[1]
  rows_out, cols_out, vals_out = [], [], []
  block = max(1, _GATHER_BUDGET // (w1 * w1 * w2))
  for s in range(0, n, block):
    r = rec[s:s + block]
    rows = np.arange(s, s + len(r))
    sub = np.where(r[:, :, None] >= 0, half[np.maximum(r, 0)], -1)
    shared = ((sub[..., None] == r[:, None, None, :]) & (sub[..., None] >= 0)).any(-1).sum(-1)
    size = (sub >= 0).sum(-1)
    expand = (r >= 0) & (shared > 2.0 / 3.0 * size)
    members = np.concatenate([r, np.where(expand[..., None], sub, -1).reshape(len(r), -1)], 1)
    members.sort(axis=1)
    valid = members >= 0
    valid[:, 1:] &= members[:, 1:] != members[:, :-1]
    # Most of the padded width is empty: distances of the members only.
    row_of = np.broadcast_to(rows[:, None], members.shape)[valid]
    cols = members[valid]
    d2 = _squared_distances(x, row_of, cols[:, None])[:, 0]
    weight = np.exp(-(d2 / scale[row_of])).astype(np.float32)
    total = np.bincount(row_of - s, weights=weight, minlength=len(r)).astype(np.float32)
    rows_out.append(row_of)
    cols_out.append(cols)
    vals_out.append(weight / total[row_of - s])
  return scipy.sparse.csr_matrix(
      (np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))),
      shape=(n, n), dtype=np.float32)


def k_reciprocal(query: ArrayLike, gallery: ArrayLike | None, indices: ArrayLike,
                 neighbors: ArrayLike, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 similarity: str = "cosine",
                 normalization: str = "farthest") -> tuple[np.ndarray, np.ndarray]:
  """k-reciprocal re-ranking (Zhong et al. 2017) of each query's candidates.

  The graph is the reference's: queries and gallery items together (queries
  may be each other's neighbours). Distances are squared Euclidean, each
  item's divided by its largest (`normalization`); V(i) spreads weight
  exp(-distance) over i's k1-reciprocal neighbours and their expansion;
  local query expansion averages V over i's top-k2 (itself included); the
  final distance is (1 - lambda) * Jaccard(V(q), V(g)) + lambda * distance.

  Args:
    query: [Q, D]; gallery: [G, D], or None when the queries are their own
      gallery (leave-one-out; then node i is query i and gallery item i).
    indices: int [Q, k] gallery indices to re-rank (`retrieval.search`).
    neighbors: int [N, L], each item's top-L neighbours within the union
      `concat(query, gallery)` (N = Q + G; N = Q for gallery=None), the
      item itself included or not: `union_neighbors(query, gallery, L)`.
      L >= max(k1 + 1, k2) (capped at N); equal to the reference wherever
      each item's true top-L is listed, ScaNN's lists give an approximation.
    k1, k2, lambda_value: the paper's hyperparameters (20, 6, 0.3).
    similarity: "cosine" (rows L2-normalised first) or "euclidean" (raw).
    normalization: "farthest" (the reference: each item's distances over
      its farthest item in the union, one extra exact top-1 search) or
      "list" (over the farthest in its own `neighbors` row: no extra pass,
      equal to the reference only when the row reaches the farthest item).

  Returns:
    (scores float32 [Q, k] = minus the final distance, indices int64 [Q, k]),
    best first.

  Cost, with S <= (k1 + 1)(round(k1 / 2) + 2) encoding entries per item:
  time O(N L D) to sort the lists, O(N k1^2 k1/2 + N S D) for the encodings,
  O(Q k k2 S) for the Jaccard terms, plus O(N^2 D) for "farthest" (a
  brute-force search, which the reference's full matrices cost too).
  Memory O(N (L + S)) and one block of [block, k, k2 S], never [N, N].
  """
  lambda_value = float(lambda_value)
  k1, k2 = _count("k1", k1, 1), _count("k2", k2, 1)
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"lambda_value must be in [0, 1] (the paper uses 0.3), got {lambda_value}.")
  if similarity not in ("cosine", "euclidean"):
    raise ValueError(f"similarity={similarity!r}: k-reciprocal needs a distance; "
                     "choose 'cosine' or 'euclidean'.")
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization={normalization!r}; choose from {NORMALIZATIONS}.")
  q = exact.prepare(_embeddings("query", query), similarity)
  same_set = gallery is None
  g = q if same_set else exact.prepare(_embeddings("gallery", gallery), similarity)
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}.")
  x = q if same_set else np.concatenate([q, g])
  offset = 0 if same_set else len(q)
  idx = _neighbour_ids("indices", indices, len(q), len(g))
  nbr = _neighbour_ids("neighbors", neighbors, len(x), len(x))

  depth = min(max(k1 + 1, k2), len(x))
  lists, listed_max = _node_lists(x, nbr, depth)
  scale = _farthest_squared(x) if normalization == "farthest" else listed_max
  scale = np.maximum(scale, np.finfo(np.float32).tiny)
  encodings = _encodings(x, lists, scale, k1)
  width = min(k2, len(x))
  k = idx.shape[1]

  def expanded(nodes):
    """Local query expansion: the mean of V over each node's top-k2."""
    pick = scipy.sparse.csr_matrix(
        (np.ones(len(nodes) * width, np.float32),
         (np.repeat(np.arange(len(nodes)), width), lists[nodes, :width].ravel())),
        shape=(len(nodes), len(x)))
    out = pick @ encodings
    out.data /= np.float32(width)
    out.sum_duplicates()
    return out

  final = np.empty(idx.shape, np.float32)
  block = max(1, 8192 // max(1, k))
  for s in range(0, len(q), block):
    qn = np.arange(s, min(s + block, len(q)))
    cn = idx[qn] + offset
    mine = expanded(qn)[np.repeat(np.arange(len(qn)), k)]
    overlap = mine.minimum(expanded(cn.ravel()))
    m = np.asarray(overlap.sum(axis=1), np.float32).reshape(len(qn), k)
    jaccard = 1.0 - m / (2.0 - m)
    dist = _squared_distances(x, qn, cn) / scale[qn, None]
    final[qn] = jaccard * (1.0 - lambda_value) + dist * lambda_value
  order = np.argsort(final, axis=1, kind="stable")
  return (-np.take_along_axis(final, order, 1),
          np.take_along_axis(idx, order, 1).astype(np.int64))
