r"""Times leave-one-out retrieval on SOP-sized synthetic embeddings.

  python benchmarks/search.py                 # 60,502 x 512
  python benchmarks/search.py --num=50000 --dim=128 \
      --backends=exact,scann
  python benchmarks/search.py --backends=limits  # exact vs matmul + top-k

Prints one JSON line per backend: wall seconds for search plus metrics, and
recall@1. Backends: ``exact`` (JAX), ``scann``, and ``faiss`` (IndexFlatIP,
a peer for speed only, skipped when faiss is not installed); ``limits``
times exact search side by side with a BLAS matmul + top-k over the same
blocks and k (what evaluate searches: max(8, largest class - 1)). What is timed:
``jaxdml/tools/search_bench.py``.
"""
import json
import time

from absl import app
from absl import flags
import numpy as np

from jaxdml.tools.search_bench import (leave_one_out_k, make_clustered, time_backend,
                                           time_matmul_limits)

_NUM = flags.DEFINE_integer("num", 60_502, "Number of embeddings (SOP test).")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension.")
_PER_CLASS = flags.DEFINE_float("per_class", 5.35, "Mean items per class.")
_NOISE = flags.DEFINE_float("noise", 1.95, "Within-class noise scale.")
_NUM_SUPER = flags.DEFINE_integer("num_super", 12, "Super-categories (SOP: 12).")
_BACKENDS = flags.DEFINE_list("backends", ["exact", "scann", "faiss"],
                              "Backends to time.")
_SEED = flags.DEFINE_integer("seed", 0, "Data seed.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  x, labels = make_clustered(_NUM.value, _DIM.value,
                             per_class=_PER_CLASS.value, noise=_NOISE.value,
                             num_super=_NUM_SUPER.value, seed=_SEED.value)
  print(json.dumps({"data": {"num": len(x), "dim": x.shape[1],
                             "classes": int(len(np.unique(labels))),
                             "devices": [str(d) for d in jax.devices()]}}),
        flush=True)
  for backend in _BACKENDS.value:
    if backend == "limits":
      print(json.dumps({"backend": "limits",
                        **time_matmul_limits(x, leave_one_out_k(labels))}), flush=True)
    else:
      print(json.dumps(time_backend(backend, x, labels)), flush=True)


if __name__ == "__main__":
  app.run(main)
