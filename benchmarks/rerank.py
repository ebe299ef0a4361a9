r"""Retrieval metrics with and without re-ranking, and the time each adds.

  # (a) a trained demo model on the embedded data, (b) a clustered gallery:
  python -m jaxdml.main --config=configs/sketchy_rtl.py:demo --workdir=/tmp/rerank_demo
  python benchmarks/rerank.py --workdir=/tmp/rerank_demo
  python benchmarks/rerank.py --sets=synthetic --num=50000 --classes=1000

Prints one JSON line per (set, method): recall@1/5/10 and map@r (per label
set: the demo's sketch -> photo protocol scores instance hits and, under
``category/``, category hits), ``search_s`` (the first search), ``index_s``
(what a method searches besides: DBA's gallery self-search, k-reciprocal's
union search), ``rerank_s`` (the re-ranking itself). Times are the fastest
of ``--repeats`` runs, so JIT compiles are left out.

Methods: ``search`` (the set's own similarity) and ``search/cosine`` (the
candidates of alpha-QE and DBA, which are cosine methods), ``alpha_qe``,
``dba``, ``dba+alpha_qe`` (alpha-QE against the augmented gallery),
``k_reciprocal`` (normalised by each item's farthest, as the reference) and
``k_reciprocal/list`` (by the farthest listed neighbour: no extra pass).
Every method re-ranks the same top ``--k`` candidates.
"""
import json
import platform
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from jaxdml import retrieval
from jaxdml.retrieval import rerank
from jaxdml.retrieval.search_bench import make_clustered

_SETS = flags.DEFINE_list("sets", ["demo", "synthetic"], "Data: demo, synthetic.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rerank_demo", "Trained demo run (set a).")
_NUM = flags.DEFINE_integer("num", 50_000, "Synthetic gallery size.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1_000, "Synthetic queries.")
_CLASSES = flags.DEFINE_integer("classes", 1_000, "Synthetic class centres.")
_DIM = flags.DEFINE_integer("dim", 64, "Synthetic embedding dimension.")
_NOISE = flags.DEFINE_float("noise", 1.4, "Synthetic within-class noise scale.")
_K = flags.DEFINE_integer("k", 100, "Candidates re-ranked per query.")
_QE_N = flags.DEFINE_integer("qe_n", 2, "alpha-QE neighbours.")
_DBA_K = flags.DEFINE_integer("dba_k", 2, "DBA neighbours.")
_ALPHA = flags.DEFINE_float("alpha", 3.0, "alpha-QE / DBA exponent.")
_K1 = flags.DEFINE_integer("k1", 20, "k-reciprocal k1.")
_K2 = flags.DEFINE_integer("k2", 6, "k-reciprocal k2.")
_LAMBDA = flags.DEFINE_float("lambda_value", 0.3, "k-reciprocal lambda.")
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
  from jaxdml import data as data_lib, embedder  # pylint: disable=g-import-not-at-top
  model = embedder.from_workdir(workdir)
  sets = data_lib.eval_sets(model.config.data, task=model.config.task)
  q, g = sets["query"], sets["gallery"]
  labels = {"": (q["labels"], g["labels"]), "category/": (q["categories"], g["categories"])}
  return (model.embed("query", q["images"]), model.embed("gallery", g["images"]), labels,
          str(model.config.eval.similarity), model.describe())


def synthetic_set():
  """Queries and gallery drawn from the same clusters (``make_clustered``)."""
  total = _NUM.value + _NUM_QUERIES.value
  x, labels = make_clustered(total, _DIM.value, per_class=total / _CLASSES.value,
                             noise=_NOISE.value, seed=0)
  # make_clustered shuffles: the first rows are queries from random clusters.
  nq = _NUM_QUERIES.value
  return (x[:nq], x[nq:], {"": (labels[:nq], labels[nq:])}, "cosine",
          f"make_clustered({total}, {_DIM.value}), {len(np.unique(labels))} classes")


def scores_of(indices, labels):
  out = {}
  for prefix, (ql, gl) in labels.items():
    rel = retrieval.count_relevant(ql, gl, same_set=False)
    if int(rel.max()) > indices.shape[1]:
      raise ValueError(f"map@r needs k >= {rel.max()}; raise --k.")
    values = retrieval.metrics_from_neighbors(gl[indices], ql, rel, ks=(1, 5, 10),
                                              metrics=("recall", "map@r"))
    out.update({prefix + name: round(v, 4) for name, v in values.items()})
  return out


def run_set(name, q, g, labels, similarity):
  k = min(_K.value, len(g))
  report = lambda method, indices, **times: print(json.dumps(
      {"set": name, "method": method, **scores_of(indices, labels),
       **{t: round(v, 3) for t, v in times.items()}}), flush=True)

  (_, native), t_native = timed(lambda: retrieval.search(q, g, k, similarity=similarity))
  report("search", native, search_s=t_native)
  (_, cand), t_cos = timed(lambda: retrieval.search(q, g, k))
  if similarity != "cosine":
    report("search/cosine", cand, search_s=t_cos)

  (_, idx), t = timed(lambda: rerank.alpha_qe(q, g, cand, n=_QE_N.value, alpha=_ALPHA.value))
  report("alpha_qe", idx, search_s=t_cos, rerank_s=t)

  depth = min(_DBA_K.value + 1, len(g))
  (_, own), t_own = timed(lambda: retrieval.search(g, g, depth, exclude_self=True))
  augment = lambda: rerank.augment_database(g, own, k=_DBA_K.value, alpha=_ALPHA.value)
  (_, idx), t = timed(lambda: rerank.rescore(q, augment(), cand))
  report("dba", idx, search_s=t_cos, index_s=t_own, rerank_s=t)

  def dba_qe():
    g_aug = augment()
    expanded = rerank.expand_queries(q, g_aug, cand, n=_QE_N.value, alpha=_ALPHA.value)
    return rerank.rescore(expanded, g_aug, cand)
  (_, idx), t = timed(dba_qe)
  report("dba+alpha_qe", idx, search_s=t_cos, index_s=t_own, rerank_s=t)

  depth = max(_K1.value + 1, _K2.value)
  union, t_union = timed(lambda: rerank.union_neighbors(q, g, depth, similarity=similarity))
  for normalization, method in (("farthest", "k_reciprocal"), ("list", "k_reciprocal/list")):
    (_, idx), t = timed(lambda: rerank.k_reciprocal(
        q, g, native, union, k1=_K1.value, k2=_K2.value, lambda_value=_LAMBDA.value,
        similarity=similarity, normalization=normalization))
    report(method, idx, search_s=t_native, index_s=t_union, rerank_s=t)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
  import jax  # pylint: disable=g-import-not-at-top
  print(json.dumps({"machine": platform.processor() or platform.machine(),
                    "devices": [str(d) for d in jax.devices()],
                    "date": time.strftime("%Y-%m-%d"),
                    "k": _K.value, "qe_n": _QE_N.value, "dba_k": _DBA_K.value,
                    "alpha": _ALPHA.value, "k1": _K1.value, "k2": _K2.value,
                    "lambda_value": _LAMBDA.value}), flush=True)
  for name in _SETS.value:
    if name == "demo":
      q, g, labels, similarity, source = demo_set(_WORKDIR.value)
    elif name == "synthetic":
      q, g, labels, similarity, source = synthetic_set()
    else:
      raise ValueError(f"--sets: unknown {name!r}; choose demo, synthetic.")
    print(json.dumps({"set": name, "source": source, "queries": len(q), "gallery": len(g),
                      "dim": q.shape[1], "similarity": similarity}), flush=True)
    run_set(name, q, g, labels, similarity)


if __name__ == "__main__":
  app.run(main)
