"""Retrieval metrics from ranked neighbour labels.

Definitions (``/work/shared/PAPERS.md``) match pytorch-metric-learning's
``AccuracyCalculator``: recall@1 is its ``precision_at_1``, and ``r_precision``
and ``map@r`` are its ``r_precision`` and ``mean_average_precision_at_r``.
Averages run over the queries with at least one relevant gallery item.

The metrics only see labels, so one search can serve several label sets: the
Sketchy protocol scores the same ranking once with instance labels and once
with category labels.
"""
import numpy as np

METRICS = ("recall", "r_precision", "map@r", "map", "mrr")
# Scores of a clustering of the queries, not of a ranking (retrieval.clustering).
CLUSTER_METRICS = ("nmi", "ami")
# Metrics that read the top-R neighbours of each query, R = its relevant count.
NEEDS_R = ("r_precision", "map@r")
# Read off the embeddings of each query's nearest neighbour (`nn_distances`).
EMBEDDING_METRICS = ("nn_distance",)


def check_metrics(metrics, ks):
  """Validates metric names and ks; returns them as tuples."""
  if isinstance(metrics, str):
    metrics = (metrics,)
  metrics = tuple(metrics)
  known = METRICS + CLUSTER_METRICS + EMBEDDING_METRICS
  unknown = [m for m in metrics if m not in known]
  if unknown or not metrics:
    raise ValueError(
        f"Unknown retrieval metrics {unknown or metrics!r}; choose from "
        f"{known}.")
  ks = tuple(int(k) for k in np.atleast_1d(ks))
  if "recall" in metrics and (not ks or min(ks) < 1):
    raise ValueError(f"ks must be positive integers for recall@K, got {ks}.")
  return metrics, ks


def count_relevant(query_labels, gallery_labels, *, same_set):
  """Number of gallery items sharing each query's label.

  Args:
    query_labels: int [Q].
    gallery_labels: int [G].
    same_set: True when the gallery is the query set itself (leave-one-out):
      the query's own entry is then not counted.

  Returns:
    int64 [Q].
  """
  query_labels = np.asarray(query_labels)
  gallery_labels = np.asarray(gallery_labels)
  uniq, counts = np.unique(gallery_labels, return_counts=True)
  if len(uniq) == 0:
    rel = np.zeros(query_labels.shape, np.int64)
  else:
    pos = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
    rel = np.where(uniq[pos] == query_labels, counts[pos], 0).astype(np.int64)
  return rel - 1 if same_set else rel


def per_query(neighbor_labels, query_labels, relevant_counts, ks, metrics, mrr_depth=None):
  """Per-query metric values (float64 [Q] each) for later averaging.

  ``map`` is the average precision over the ranking given, divided by R
  (AccuracyCalculator's ``mean_average_precision``): the full mAP when the
  ranking covers the whole gallery, a truncated one otherwise. ``mrr`` is
  1 / the rank of the first hit within the first ``mrr_depth`` neighbours
  (default: all given), 0 without one (AccuracyCalculator's
  ``mean_reciprocal_rank``, whose depth is its k).
  """
  metrics, ks = check_metrics(metrics, ks)
  nl = np.asarray(neighbor_labels)
  ql = np.asarray(query_labels)
  rel = np.asarray(relevant_counts, np.int64)
  if nl.ndim != 2 or ql.shape != (nl.shape[0],) or rel.shape != ql.shape:
    raise ValueError(
        "Expected neighbor_labels [Q, k], query_labels [Q] and "
        f"relevant_counts [Q]; got {nl.shape}, {ql.shape}, {rel.shape}.")
  k = nl.shape[1]
  if "recall" in metrics and max(ks) > k:
    raise ValueError(
        f"recall@{max(ks)} needs at least {max(ks)} neighbours per query but "
        f"neighbor_labels has {k}; search with a larger k.")
  valid = rel > 0
  if any(m in NEEDS_R for m in metrics) and valid.any():
    need = int(rel[valid].max())
    if need > k:
      raise ValueError(
          f"r_precision / map@r need the top-R neighbours, R up to {need}, but "
          f"neighbor_labels has only {k} columns; search with k >= {need}.")
  hits = nl == ql[:, None]
  ranks = np.arange(1, k + 1)
  safe_r = np.maximum(rel, 1)
  out = {}
  first_hit = np.where(hits.any(1), hits.argmax(1) + 1, k + 1)
  if "mrr" in metrics:
    depth = k if mrr_depth is None else int(mrr_depth)
    out["mrr"] = np.where(first_hit <= depth, 1.0 / first_hit, 0.0)
  if "recall" in metrics:
    for kk in ks:
      out[f"recall@{kk}"] = (first_hit <= kk).astype(np.float64)
  in_r = hits & (ranks[None, :] <= rel[:, None])
  if "r_precision" in metrics:
    out["r_precision"] = in_r.sum(1) / safe_r
  if "map@r" in metrics:
    prec = np.cumsum(in_r, 1) / ranks
    out["map@r"] = (prec * in_r).sum(1) / safe_r
  if "map" in metrics:
    prec = np.cumsum(hits, 1) / ranks
    out["map"] = (prec * hits).sum(1) / safe_r
  return out, valid


def nn_distances(queries, nearest) -> np.ndarray:
  """Euclidean distances between L2-normalised rows and their neighbours' [Q]."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.linalg.norm(unit(np.asarray(queries, np.float32))
                        - unit(np.asarray(nearest, np.float32)), axis=1)


def average(values, valid):
  """Means over valid queries; NaN when no query has a relevant item."""
  n = int(np.sum(valid))
  return {name: float(v[valid].sum() / n) if n else float("nan")
          for name, v in values.items()}


def metrics_from_neighbors(neighbor_labels, query_labels, relevant_counts, ks=(
    1, 2, 4, 8), metrics=("recall", "r_precision", "map@r")):
  """Retrieval metrics from the labels of each query's ranked neighbours.

  Args:
    neighbor_labels: [Q, k] labels of the retrieved gallery items, best first
      (``gallery_labels[indices]`` from ``search``).
    query_labels: [Q] labels of the queries.
    relevant_counts: [Q] number of relevant gallery items per query, the
      query itself excluded in the same-set protocol (``count_relevant``).
      Queries with 0 are left out of the averages, as AccuracyCalculator does.
    ks: the K of recall@K; every K must be <= k.
    metrics: subset of ``("recall", "r_precision", "map@r", "map", "mrr")``.
      ``r_precision`` and ``map@r`` need k >= max R, else ValueError.

  Returns:
    dict with ``recall@K`` per K, ``r_precision``, ``map@r``, ``map`` as
    requested; Python floats in [0, 1].
  """
  values, valid = per_query(neighbor_labels, query_labels, relevant_counts,
                            ks, metrics)
  return average(values, valid)
