"""Approximate search with ScaNN, imported lazily (it pulls in TensorFlow).

Index settings follow the gallery size (``default_config``): brute force
below 20k items, where building a tree costs more than it saves; above,
a k-means tree with ~sqrt(N) leaves, asymmetric hashing (2 dims per 4-bit
code, anisotropic threshold 0.2 for inner products, codebooks trained on
10k samples, 3 iterations) and exact re-scoring of the best ``reorder_k`` =
max(4k, 100) candidates.

No fixed fraction of the leaves holds recall on every data set, so every
tree search is audited (``audit``): a sample of the queries
(``audit_sample``, 1,000) is searched exactly and with ScaNN, and
``reorder_k`` or ``num_leaves_to_search`` (the cheaper first, then both)
double until the sample meets the target: recall@1 and recall@k within ``audit_max_gap`` points (0.1) of
exact, by the labels when the caller has them (`evaluate`), else by the
exact neighbours themselves. Where even every leaf and a 16x deeper
re-scoring miss it, the whole search runs exactly instead. The report
(``scann/...``) goes out with the metrics.

The search starts at a tenth of the leaves: measured at SOP size
(60,502 x 512, ``benchmarks/search.py``) on two differently clustered sets,
the audit kept it there and R@1 stayed within 0.15 points of exact; a
fifth was ~25 % slower for nothing, a twentieth lost 3.6 points unaudited
(ScaNN's GloVe example searches 0.5 %). The codebooks' smaller training
(10k x 3 where ScaNN's example has 100k x 10) measured the same recall at
0.5 s less.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

from absl import logging
import numpy as np
from numpy.typing import ArrayLike

from jaxdml import extras
from jaxdml.retrieval import exact

BRUTE_FORCE_BELOW = 20_000
CONFIG_KEYS = ("brute_force", "num_leaves", "num_leaves_to_search",
               "training_sample_size", "dimensions_per_block",
               "anisotropic_quantization_threshold", "ah_training_sample_size",
               "ah_training_iterations", "reorder_k", "batch_size",
               "audit_sample", "audit_max_gap")
# How far the audit may deepen re-scoring beyond the configured reorder_k.
AUDIT_MAX_REORDER_GROWTH = 16


def _import_scann():
  """ScaNN's searcher module; without it, one error naming the extra (or
  backend='exact')."""
  return extras.require("scann.scann_ops.py.scann_ops_pybind",
                        "backend='scann' (use backend='exact' without it)")


def default_config(num_gallery: int, k: int, similarity: str = "cosine") -> dict[str, Any]:
  """ScaNN settings for a gallery of ``num_gallery`` items and top-``k``.

  The tree settings are filled in even when ``brute_force`` is True, so that
  ``scann_config={"brute_force": False}`` alone turns the tree on.
  """
  num_leaves = max(1, int(round(math.sqrt(num_gallery))))
  return {
      "brute_force": num_gallery < BRUTE_FORCE_BELOW,
      "num_leaves": num_leaves,
      "num_leaves_to_search": max(1, num_leaves // 10),
      "training_sample_size": min(num_gallery, 100_000),
      "dimensions_per_block": 2,
      # Anisotropic quantisation targets inner products only.
      "anisotropic_quantization_threshold": (
          float("nan") if similarity == "euclidean" else 0.2),
      # Codebook training dominates the build (44 s of 58 s at 60k x 512 with
      # ScaNN's 100k samples x 10 iterations); 10k x 3 gave the same recall.
      "ah_training_sample_size": min(num_gallery, 10_000),
      "ah_training_iterations": 3,
      "reorder_k": max(4 * k, 100),
      "batch_size": 256,
      # Queries searched both ways to check recall (0 turns the audit off).
      "audit_sample": 1000,
      # Largest allowed recall loss on that sample, in points (percent).
      "audit_max_gap": 0.1,
  }


def resolve_config(num_gallery: int, k: int, similarity: str,
                   scann_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """``default_config`` updated by ``scann_config``; unknown keys raise."""
  cfg = default_config(num_gallery, k, similarity)
  unknown = sorted(set(scann_config or {}) - set(CONFIG_KEYS))
  if unknown:
    raise ValueError(f"Unknown scann_config keys {unknown}; valid keys are "
                     f"{CONFIG_KEYS}.")
  cfg.update(scann_config or {})
  # ScaNN can only return what it re-scored, and cannot search absent leaves.
  cfg["reorder_k"] = max(int(cfg["reorder_k"]), k)
  cfg["num_leaves_to_search"] = min(int(cfg["num_leaves_to_search"]),
                                    int(cfg["num_leaves"]))
  return cfg


def build_searcher(gallery: np.ndarray, k: int, *, similarity: str = "cosine",
                   config: Mapping[str, Any]) -> Any:
  """Builds a ScaNN searcher over the (prepared) float32 gallery.

  `gallery` float32 [G, D].
  """
  ops = _import_scann()
  measure = "squared_l2" if similarity == "euclidean" else "dot_product"
  builder = ops.builder(gallery, k, measure)
  # ScaNN's default (0) trained the codebooks ~10 % slower than all cores.
  builder.set_n_training_threads(os.cpu_count() or 1)
  if config["brute_force"]:
    builder = builder.score_brute_force()
  else:
    builder = builder.tree(
        num_leaves=config["num_leaves"],
        num_leaves_to_search=config["num_leaves_to_search"],
        training_sample_size=config["training_sample_size"])
    builder = builder.score_ah(
        config["dimensions_per_block"],
        anisotropic_quantization_threshold=config[
            "anisotropic_quantization_threshold"],
        training_sample_size=config["ah_training_sample_size"],
        training_iterations=config["ah_training_iterations"])
    builder = builder.reorder(config["reorder_k"])
  return builder.build()


def drop_self(scores: np.ndarray, indices: np.ndarray,
              self_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Removes each row's self hit (index == ``self_index``, default the row
  number); rows without one lose the last column. The same rule as
  AccuracyCalculator after a k+1 search.

  `scores` float32 and `indices` int [Q, k1], `self_index` int [Q]; both results [Q, k1 - 1].
  """
  q, k1 = indices.shape
  self_index = np.arange(q) if self_index is None else np.asarray(self_index)
  is_self = indices == self_index[:, None]
  is_self[~is_self.any(1), k1 - 1] = True
  keep = ~is_self
  return (scores[keep].reshape(q, k1 - 1), indices[keep].reshape(q, k1 - 1))


def audit(searcher: Any, q: np.ndarray, g: np.ndarray, k: int, *, exclude_self: bool,
          similarity: str, config: Mapping[str, Any],
          labels: tuple[ArrayLike, ArrayLike] | None = None, seed: int = 0) -> dict[str, Any]:
  """Deepens the search until a sample of the queries meets the target.

  `q` float32 [Q, D], `g` float32 [G, D].

  Args:
    searcher: a ScaNN tree searcher over ``g``.
    q, g: prepared query and gallery embeddings.
    k: neighbours per query (as searched, self included).
    exclude_self: row i of ``q`` is gallery item i (leave-one-out).
    similarity: as in ``search``.
    config: the resolved config; ``audit_sample``, ``audit_max_gap``,
      ``num_leaves``, ``num_leaves_to_search``, ``reorder_k`` are read.
    labels: ``(query_labels, gallery_labels)`` or None. With labels the
      target is the recall the evaluation reports (a hit is a neighbour of
      the query's label); without, the exact top-k are the truth.

  Returns:
    dict: ``leaves`` and ``reorder_k`` to search with (None: the target is
    out of reach, search exactly), and the ``scann/`` report.
  """
  n = min(int(config["audit_sample"]), q.shape[0])
  rows = np.sort(np.random.default_rng(seed).choice(q.shape[0], n, replace=False))
  k_out = k - int(exclude_self)
  # The sample's exact answer: the same rule, k+1 then drop self by index.
  # Rows are prepared already: cosine is their dot (no second normalisation
  # of the whole gallery).
  exact_scores, exact_idx = exact.search(
      q[rows], g, k, similarity="dot" if similarity == "cosine" else similarity)
  if exclude_self:
    exact_scores, exact_idx = drop_self(exact_scores, exact_idx, rows)

  def recalls(idx):
    """recall@1 and recall@k of the sample, in points."""
    if labels is None:  # the exact neighbours are the truth
      r1 = np.mean(idx[:, 0] == exact_idx[:, 0])
      rk = np.mean([np.isin(i, e).mean() for i, e in zip(idx, exact_idx)])
    else:
      hits = labels[1][idx] == labels[0][rows, None]
      r1, rk = np.mean(hits[:, 0]), np.mean(hits.any(axis=1))
    return 100 * float(r1), 100 * float(rk)

  exact_r1, exact_rk = recalls(exact_idx)
  max_leaves = int(config["num_leaves"])
  max_reorder = int(config["reorder_k"]) * AUDIT_MAX_REORDER_GROWTH

  def trial(leaves, reorder):
    """(target met, gap, neighbours) of the sample at this depth."""
    idx, _ = searcher.search_batched(q[rows], final_num_neighbors=k, leaves_to_search=leaves,
                                     pre_reorder_num_neighbors=reorder)
    idx = np.asarray(idx, np.int64)
    if exclude_self:
      _, idx = drop_self(np.zeros(idx.shape, np.float32), idx, rows)
    r1, rk = recalls(idx)
    gaps = (exact_r1 - r1, exact_rk - rk)
    return max(gaps) <= float(config["audit_max_gap"]) + 1e-9, gaps, idx

  leaves, reorder = int(config["num_leaves_to_search"]), int(config["reorder_k"])
  met, gaps, idx = trial(leaves, reorder)
  while not met and (leaves < max_leaves or reorder < max_reorder):
    # Cheapest first: deeper re-scoring (exact dots of a few more candidates
    # per query), then more leaves (the bulk of a search's work), then both.
    deeper = (leaves, min(2 * reorder, max_reorder))
    wider = (min(2 * leaves, max_leaves), reorder)
    both = (wider[0], deeper[1])
    # Each candidate is deeper than now in one setting at least; the last
    # one tried (met, or the deepest) is where the next round starts.
    for candidate in dict.fromkeys(c for c in (deeper, wider, both) if c != (leaves, reorder)):
      met, gaps, idx = trial(*candidate)
      tried = candidate
      if met:
        break
    leaves, reorder = tried
  agreement = float(np.mean([len(set(a) & set(b)) / k_out for a, b in zip(idx, exact_idx)]))
  return {"leaves": leaves if met else None, "reorder_k": reorder if met else None,
          "report": {"scann/sample_size": n, "scann/sample_agreement": agreement,
                     # Rounded: a one-query gap of 1,000 reads 0.1, not 0.10000000000000853.
                     "scann/sample_recall_gap@1": round(gaps[0], 6),
                     f"scann/sample_recall_gap@{k_out}": round(gaps[1], 6),
                     "scann/num_leaves_to_search": leaves, "scann/reorder_k": reorder,
                     "scann/target_met": int(met)}}


def search(query: ArrayLike, gallery: ArrayLike, k: int, *, exclude_self: bool = False,
           similarity: str = "cosine", scann_config: Mapping[str, Any] | None = None,
           labels: tuple[ArrayLike, ArrayLike] | None = None
           ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """ScaNN top-k and its audit; see ``jaxdml.retrieval.search`` for the
  arguments, ``audit`` for ``labels``.

  Scores float32 [Q, k], indices int64 [Q, k].

  Returns:
    ``(scores, indices, report)``: the ``scann/`` audit report is empty for
    brute force (exact up to float rounding) or ``audit_sample=0``.
  """
  q = exact.prepare(query, similarity)
  g = exact.prepare(gallery, similarity)
  k_search = k + 1 if exclude_self else k
  cfg = resolve_config(g.shape[0], k_search, similarity, scann_config)
  searcher = build_searcher(g, k_search, similarity=similarity, config=cfg)
  chosen = {"leaves": None, "reorder_k": None, "report": {}}
  if not cfg["brute_force"] and int(cfg["audit_sample"]) > 0:
    chosen = audit(searcher, q, g, k_search, exclude_self=exclude_self,
                   similarity=similarity, config=cfg, labels=labels)
    if chosen["leaves"] is None:
      logging.warning("ScaNN misses the recall target (%s) even searching every leaf: "
                      "searching exactly instead.", chosen["report"])
      scores, idx = exact.search(query, gallery, k, exclude_self=exclude_self,
                                 similarity=similarity)
      return scores, idx, {**chosen["report"], "scann/fallback_exact": 1}
  idx, dist = searcher.search_batched_parallel(
      q, final_num_neighbors=k_search, batch_size=cfg["batch_size"],
      leaves_to_search=chosen["leaves"], pre_reorder_num_neighbors=chosen["reorder_k"])
  idx = np.asarray(idx, np.int64)
  scores = np.asarray(dist, np.float32)
  if similarity == "euclidean":
    scores = -scores  # ScaNN returns squared distances; we rank by score.
  if idx.shape != (q.shape[0], k_search):
    raise RuntimeError(
        f"ScaNN returned {idx.shape[1]} neighbours per query, {k_search} "
        "asked: search more leaves (scann_config['num_leaves_to_search']).")
  if exclude_self:
    scores, idx = drop_self(scores, idx)
  return scores, idx, chosen["report"]
