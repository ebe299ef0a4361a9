r"""Retrieval metrics without and with each re-ranking, and the time each adds.

  # (a) the trained SBIR demo's embeddings, (b) a clustered synthetic gallery:
  python -m jaxdml.main --config=configs/sketchy_rtl.py:demo --workdir=/tmp/rerank_demo
  python benchmarks/rerank.py --workdir=/tmp/rerank_demo
  python benchmarks/rerank.py --sets=synthetic --num=50000 --dim=128 --classes=2000

Everything goes through `retrieval.evaluate(..., rerank=spec)`, the path an
evaluator takes (`config.evals.NAME.rerank`): the first search fetches
`--depth` candidates, the method reorders them, the metrics read the
reordered lists. Prints one JSON line per (set, method): recall@1/10 and
map@r (the demo's sketch -> photo protocol: instance hits, and category
hits under ``category/``), ``seconds`` (the whole evaluation, the fastest of
``--repeats`` runs, so JIT compiles are left out) and ``added_s`` (over no
re-ranking).
"""
import json
import platform
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from jaxdml import retrieval
from jaxdml.tools.search_bench import make_clustered

_SETS = flags.DEFINE_list("sets", ["demo", "synthetic"], "Data: demo, synthetic.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rerank_demo", "Trained demo run (set a).")
_NUM = flags.DEFINE_integer("num", 50_000, "Synthetic gallery size.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1_000, "Synthetic queries.")
_CLASSES = flags.DEFINE_integer("classes", 2_000, "Synthetic class centres.")
_DIM = flags.DEFINE_integer("dim", 128, "Synthetic embedding dimension.")
_NOISE = flags.DEFINE_float("noise", 1.6, "Synthetic within-class noise (norm).")
_DEPTH = flags.DEFINE_integer("depth", 100, "Candidates the first search fetches.")
_METHODS = flags.DEFINE_list("methods", ["alpha_qe", "dba", "k_reciprocal"],
                             "Re-rankings, each with its default hyperparameters.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per timing; the fastest counts.")


def timed(fn):
  """(result, fastest wall seconds) of `_REPEATS` calls."""
  best, result = float("inf"), None
  for _ in range(max(1, _REPEATS.value)):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return result, best


def demo_set(workdir):
  """Sketch queries and photo gallery of the demo's test split, embedded."""
  from jaxdml import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxdml.apps import embedder  # pylint: disable=g-import-not-at-top
  model = embedder.from_workdir(workdir)
  sets = data_lib.eval_sets(model.config.data, task=model.config.task)
  q, g = sets["query"], sets["gallery"]
  return dict(query=model.embed("query", q["images"]), query_labels=q["labels"],
              gallery=model.embed("gallery", g["images"]), gallery_labels=g["labels"],
              label_sets={"category/": (q["categories"], g["categories"])},
              similarity=str(model.config.evals.retrieval.similarity),
              source=model.describe())


def synthetic_set():
  """Queries and gallery drawn from the same clusters (`make_clustered`)."""
  total = _NUM.value + _NUM_QUERIES.value
  x, labels = make_clustered(total, _DIM.value, per_class=total / _CLASSES.value,
                             noise=_NOISE.value, seed=0)
  nq = _NUM_QUERIES.value  # make_clustered shuffles: the first rows are random clusters'
  return dict(query=x[:nq], query_labels=labels[:nq], gallery=x[nq:], gallery_labels=labels[nq:],
              label_sets={}, similarity="cosine",
              source=f"make_clustered({total}, {_DIM.value}), {len(np.unique(labels))} classes, "
                     f"noise {_NOISE.value}")


def run_set(name, s):
  def evaluate(spec):
    return retrieval.evaluate(
        s["query"], s["query_labels"], s["gallery"], s["gallery_labels"], ks=(1, 10),
        metrics=("recall", "map@r"), similarity=s["similarity"], label_sets=s["label_sets"],
        rerank=spec)
  base = None
  for method in ["none"] + _METHODS.value:
    spec = None if method == "none" else {"name": method, "depth": _DEPTH.value}
    scores, seconds = timed(lambda spec=spec: evaluate(spec))
    base = seconds if base is None else base
    print(json.dumps({"set": name, "method": method,
                      **{k: round(v, 4) for k, v in scores.items()},
                      "seconds": round(seconds, 3), "added_s": round(seconds - base, 3)}),
          flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
  import jax  # pylint: disable=g-import-not-at-top
  print(json.dumps({"machine": platform.processor() or platform.machine(),
                    "devices": [str(d) for d in jax.devices()],
                    "date": time.strftime("%Y-%m-%d"), "depth": _DEPTH.value}), flush=True)
  for name in _SETS.value:
    if name == "demo":
      s = demo_set(_WORKDIR.value)
    elif name == "synthetic":
      s = synthetic_set()
    else:
      raise ValueError(f"--sets: unknown {name!r}; choose demo, synthetic.")
    print(json.dumps({"set": name, "source": s["source"], "queries": len(s["query"]),
                      "gallery": len(s["gallery"]), "dim": s["query"].shape[1],
                      "similarity": s["similarity"]}), flush=True)
    run_set(name, s)


if __name__ == "__main__":
  app.run(main)
