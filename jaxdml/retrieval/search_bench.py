"""Timing leave-one-out retrieval on SOP-like synthetic embeddings.

Used by `benchmarks/search.py` (the CLI) and `jaxdml.device_check`. Timings
include index building and host transfers; JAX compilation (warm-up on a
small slice) and the one-off `import scann` (TensorFlow, reported as
`import_seconds`) are excluded; ScaNN's index training is included (it is
part of every evaluation).
"""
import time

import numpy as np

from jaxdml import retrieval
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
