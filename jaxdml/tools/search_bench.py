"""Timing leave-one-out retrieval on SOP-like synthetic embeddings.

Used by `benchmarks/search.py` (the CLI) and `jaxdml.device_check`. Timings
include index building and host transfers; JAX compilation (warm-up on a
small slice) and the one-off `import scann` (TensorFlow, reported as
`import_seconds`) are excluded; ScaNN's index training and recall audit are
included (they are part of every evaluation).

`time_matmul_limits` times what exact search is held to, over the same
query blocks and the same k: a BLAS matmul (numpy's) + top-k
(`argpartition`, then a sort of the k), XLA's matmul + `lax.top_k`, and
XLA's matmul alone (+ a row max, so that the product is written once): the
floor of any exact search on this machine.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdml import retrieval
from jaxdml.retrieval import exact
from jaxdml.retrieval import scann_backend


def make_clustered(num, dim, *, per_class=5.35, noise=1.95, num_super=12,
                   seed=0):
  """Clustered unit embeddings with SOP-like structure, and their labels.

  ``num_super`` super-categories (SOP has 12) hold class centres; each item
  is its class centre plus isotropic noise of norm ~``noise``, L2-normalised.
  Class sizes are 2 + Poisson(per_class - 2) so that every class has >= 2
  items (every query has a relevant item, as in SOP). With the defaults,
  exact recall@1 is ~0.8 (SOP-like difficulty, so approximate search errors
  show).

  Returns:
    (float32 [num, dim], int32 [num]) with items shuffled.
  """
  rng = np.random.default_rng(seed)
  sizes = 2 + rng.poisson(max(per_class - 2.0, 0.0), size=num)
  num_classes = int(np.searchsorted(np.cumsum(sizes), num)) + 1
  labels = np.repeat(np.arange(num_classes, dtype=np.int32),
                     sizes[:num_classes])[:num]
  if np.sum(labels == labels[-1]) < 2:  # never leave a lone last class
    labels[-1] = labels[-2]
  supers = rng.normal(size=(num_super, dim))
  centres = (supers[rng.integers(num_super, size=num_classes)]
             + 1.5 * rng.normal(size=(num_classes, dim)))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  x = centres[labels] + noise * rng.normal(size=(num, dim)) / np.sqrt(dim)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  order = rng.permutation(num)
  return x[order].astype(np.float32), labels[order]


def _faiss_recall(x, labels):
  """faiss IndexFlatIP leave-one-out recall@1 (x already unit-norm)."""
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(x.shape[1])
  index.add(x)
  _, idx = index.search(x, 2)
  # Drop the self hit by index, else the second column is the 2nd neighbour.
  first = np.where(idx[:, 0] == np.arange(len(x)), idx[:, 1], idx[:, 0])
  return float(np.mean(labels[first] == labels))


def _numpy_top_k(x, start, block, k):
  """One block of the BLAS anchor: leave-one-out top-k, best first."""
  s = x[start:start + block] @ x.T
  rows = np.arange(s.shape[0])
  s[rows, start + rows] = -np.inf
  top = np.argpartition(-s, k, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
  return np.take_along_axis(top, order, 1)


@jax.jit
def _xla_top_k(q, g, start, k_ref):
  s = jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST)
  rows = jnp.arange(q.shape[0])
  s = s.at[rows, start + rows].set(-jnp.inf)
  return jax.lax.top_k(s, k_ref.shape[0])


@jax.jit
def _xla_matmul(q, g):
  return jnp.dot(q, g.T, precision=jax.lax.Precision.HIGHEST).max(axis=1)


def leave_one_out_k(labels):
  """The depth `evaluate` searches leave-one-out with its default metrics:
  max(8, the largest class - 1)."""
  return max(8, int(np.unique(labels, return_counts=True)[1].max()) - 1)


def time_matmul_limits(x, k, *, rounds=2):
  """Seconds of leave-one-out top-``k`` over unit rows ``x``, best of
  ``rounds``, side by side: jaxdml's exact search and the anchors above.
  Query blocks are exact search's own on one device."""
  x = exact.prepare(x, "cosine")
  block = min(exact.query_block_size(len(x), k, jax.local_device_count()), len(x))
  starts = range(0, len(x) - block + 1, block)  # whole blocks only...
  scale = len(x) / (len(starts) * block)  # ...scaled to the whole set
  xd = jax.device_put(x)
  k_ref = jnp.zeros(k)
  jax.block_until_ready((_xla_top_k(xd[:block], xd, 0, k_ref), _xla_matmul(xd[:block], xd)))
  exact.search(x[:2 * block], x, k, exclude_self=False)  # compiles the tile shapes
  runs = {
      "exact": lambda: exact.search(x, x, k, exclude_self=True),
      "blas_matmul_top_k": lambda: [_numpy_top_k(x, s, block, k) for s in starts],
      "xla_matmul_top_k": lambda: jax.block_until_ready(
          [_xla_top_k(xd[s:s + block], xd, s, k_ref) for s in starts]),
      "xla_matmul_only": lambda: jax.block_until_ready(
          [_xla_matmul(xd[s:s + block], xd) for s in starts]),
  }
  best = {name: float("inf") for name in runs}
  for _ in range(rounds):  # rounds alternate, so a noisy moment hits all
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds = time.perf_counter() - start
      best[name] = min(best[name], seconds if name == "exact" else seconds * scale)
  out = {f"{name}_seconds": round(v, 2) for name, v in best.items()}
  out.update(num=len(x), k=k, block=block,
             exact_over_blas_top_k=round(best["exact"] / best["blas_matmul_top_k"], 3),
             exact_over_xla_top_k=round(best["exact"] / best["xla_matmul_top_k"], 3),
             exact_over_matmul_only=round(best["exact"] / best["xla_matmul_only"], 3))
  return out


def time_backend(backend, x, labels):
  """Seconds and metrics of one leave-one-out evaluation."""
  if backend == "faiss":
    try:
      import faiss  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      return {"backend": backend, "skipped": "faiss not installed"}
    start = time.perf_counter()
    r1 = _faiss_recall(x, labels)
    return {"backend": backend, "seconds": round(time.perf_counter() - start,
                                                 2), "recall@1": r1}
  extra = {}
  if backend == "exact":  # compile outside the timing
    retrieval.evaluate(x[:2000], labels[:2000], ks=(1,))
  if backend == "scann":  # importing scann imports TensorFlow: a one-off cost
    start = time.perf_counter()
    scann_backend._import_scann()  # pylint: disable=protected-access
    extra["import_seconds"] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  res = retrieval.evaluate(x, labels, ks=(1, 2, 4, 8), backend=backend)
  seconds = time.perf_counter() - start
  return {"backend": backend, "seconds": round(seconds, 2), **extra, **res}
