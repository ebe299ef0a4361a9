"""Approximate search with ScaNN, imported lazily (it pulls in TensorFlow).

Index settings follow the gallery size (``default_config``): brute force
below 20k items, where building a tree costs more than it saves; above,
a k-means tree with ~sqrt(N) leaves, asymmetric hashing (2 dims per 4-bit
code, anisotropic threshold 0.2 for inner products, codebooks trained on
25k samples) and exact re-scoring of the best ``reorder_k`` = max(4k, 100)
candidates. ``num_leaves_to_search`` is a fifth of the leaves: our choice,
measured on SOP-sized clustered synthetic data (``benchmarks/search.py``): a fifth
stays ~0.1 points from exact recall@1, a tenth ~0.2, 4% loses ~6 points
(ScaNN's GloVe example searches 0.5% of the leaves).
"""
import math

import numpy as np

from jaxdml.retrieval import exact

BRUTE_FORCE_BELOW = 20_000
CONFIG_KEYS = ("brute_force", "num_leaves", "num_leaves_to_search",
               "training_sample_size", "dimensions_per_block",
               "anisotropic_quantization_threshold", "ah_training_sample_size",
               "ah_training_iterations", "reorder_k", "batch_size")


def _import_scann():
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "backend='scann' needs the scann package: `pip install scann==1.4.2` "
        "(it needs tensorflow-cpu 2.20), or use backend='exact'.") from e
  return scann_ops_pybind


def default_config(num_gallery, k, similarity="cosine"):
  """ScaNN settings for a gallery of ``num_gallery`` items and top-``k``.

  The tree settings are filled in even when ``brute_force`` is True, so that
  ``scann_config={"brute_force": False}`` alone turns the tree on.
  """
  num_leaves = max(1, int(round(math.sqrt(num_gallery))))
  return {
      "brute_force": num_gallery < BRUTE_FORCE_BELOW,
      "num_leaves": num_leaves,
      "num_leaves_to_search": max(1, num_leaves // 5),
      "training_sample_size": min(num_gallery, 100_000),
      "dimensions_per_block": 2,
      # Anisotropic quantisation targets inner products only.
      "anisotropic_quantization_threshold": (
          float("nan") if similarity == "euclidean" else 0.2),
      # Codebook training dominates the build (44 s of 58 s at 60k x 512 with
      # ScaNN's 100k samples x 10 iterations); 25k x 5 gave the same recall.
      "ah_training_sample_size": min(num_gallery, 25_000),
      "ah_training_iterations": 5,
      "reorder_k": max(4 * k, 100),
      "batch_size": 256,
  }


def resolve_config(num_gallery, k, similarity, scann_config):
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


def build_searcher(gallery, k, *, similarity="cosine", config):
  """Builds a ScaNN searcher over the (prepared) float32 gallery."""
  ops = _import_scann()
  measure = "squared_l2" if similarity == "euclidean" else "dot_product"
  builder = ops.builder(gallery, k, measure)
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


def drop_self(scores, indices):
  """Removes each row's self hit (index == row); rows without one lose the
  last column. The same rule as AccuracyCalculator after a k+1 search."""
  q, k1 = indices.shape
  is_self = indices == np.arange(q)[:, None]
  is_self[~is_self.any(1), k1 - 1] = True
  keep = ~is_self
  return (scores[keep].reshape(q, k1 - 1), indices[keep].reshape(q, k1 - 1))


def search(query, gallery, k, *, exclude_self=False, similarity="cosine",
           scann_config=None):
  """ScaNN top-k; see ``jaxdml.retrieval.search`` for the arguments."""
  q = exact.prepare(query, similarity)
  g = exact.prepare(gallery, similarity)
  k_search = k + 1 if exclude_self else k
  cfg = resolve_config(g.shape[0], k_search, similarity, scann_config)
  searcher = build_searcher(g, k_search, similarity=similarity, config=cfg)
  idx, dist = searcher.search_batched_parallel(
      q, final_num_neighbors=k_search, batch_size=cfg["batch_size"])
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
  return scores, idx
