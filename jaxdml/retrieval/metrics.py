"""Retrieval metrics from ranked neighbour labels.

Definitions (``/work/shared/PAPERS.md``) are pytorch-metric-learning 2.9.0's
``AccuracyCalculator``'s, equal on the same neighbours
(``tests/test_accuracy_calculator.py``): recall@1 is its ``precision_at_1``;
``r_precision``, ``map@r``, ``map`` and ``mrr`` are its ``r_precision``,
``mean_average_precision_at_r``, ``mean_average_precision`` and
``mean_reciprocal_rank``, each read to the same depth (its ``k``).
Averages run over the queries with at least one relevant gallery item
(``average``: per query, or per class as its ``avg_of_avgs`` and
``return_per_class``).

The metrics only see which neighbours are relevant, so one search can serve
several label sets: the Sketchy protocol scores the same ranking once with
instance labels and once with category labels.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike

METRICS = ("recall", "r_precision", "map@r", "map", "mrr")
# Scores of a clustering of the queries, not of a ranking (retrieval.clustering).
CLUSTER_METRICS = ("nmi", "ami")
# Metrics that read the top-R neighbours of each query, R = its relevant count.
NEEDS_R = ("r_precision", "map@r")
# Read off the embeddings of each query's nearest neighbour (`nn_distances`).
EMBEDDING_METRICS = ("nn_distance",)
# AccuracyCalculator's names of the same metrics, for a clearer error.
PML_NAMES = {"precision_at_1": "recall", "r_precision": "r_precision",
             "mean_average_precision_at_r": "map@r", "mean_average_precision": "map",
             "mean_reciprocal_rank": "mrr", "NMI": "nmi", "AMI": "ami"}
# Unique labels compared at once by a custom `label_comparison_fn`.
_LABEL_CHUNK = 256


def check_metrics(metrics: Sequence[str], ks: Sequence[int], *,
                  allow_empty: bool = False) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Validates metric names and ks; returns them as tuples."""
  if isinstance(metrics, str):
    metrics = (metrics,)
  metrics = tuple(metrics)
  known = METRICS + CLUSTER_METRICS + EMBEDDING_METRICS
  unknown = [m for m in metrics if m not in known]
  if unknown or not (metrics or allow_empty):
    renamed = [f"{m!r} is {PML_NAMES[m]!r}" for m in unknown if m in PML_NAMES]
    raise ValueError(
        f"Unknown retrieval metrics {unknown or metrics!r}; choose from {known}"
        + (f" (AccuracyCalculator's {', '.join(renamed)})." if renamed else "."))
  ks = tuple(int(k) for k in np.atleast_1d(ks))
  if "recall" in metrics and (not ks or min(ks) < 1):
    raise ValueError(f"ks must be positive integers for recall@K, got {ks}.")
  return metrics, ks


def relevance(query_labels: ArrayLike, neighbor_labels: ArrayLike,
              label_comparison_fn: Optional[Callable] = None) -> np.ndarray:
  """Which neighbours are relevant to their query: bool [Q, k].

  Args:
    query_labels: [Q] (or [Q, ...] with ``label_comparison_fn``).
    neighbor_labels: [Q, k] (or [Q, k, ...]).
    label_comparison_fn: None for label equality, else AccuracyCalculator's
      predicate: ``fn(query_labels[:, None], neighbor_labels)`` broadcasts
      to bool [Q, k] (numpy arrays in, e.g. hierarchical labels
      ``lambda a, b: a[..., 0] == b[..., 0]``).
  """
  query_labels = np.asarray(query_labels)
  neighbor_labels = np.asarray(neighbor_labels)
  if label_comparison_fn is None:
    return neighbor_labels == query_labels[:, None]
  hits = np.asarray(label_comparison_fn(query_labels[:, None], neighbor_labels))
  if hits.shape != neighbor_labels.shape[:2]:
    raise ValueError(f"label_comparison_fn(query_labels[:, None], neighbor_labels) must give "
                     f"bool {neighbor_labels.shape[:2]}, got shape {hits.shape}; compare "
                     "along the label's own trailing axes, e.g. a[..., 0] == b[..., 0].")
  return hits.astype(bool)


def _unique_rows(labels):
  """(unique labels, inverse) of [N] or [N, ...] labels, rows as units."""
  labels = np.asarray(labels)
  # `axis` only where rows are labels: it refuses object arrays.
  uniq, inverse = np.unique(labels, axis=0 if labels.ndim > 1 else None, return_inverse=True)
  return uniq, np.asarray(inverse).reshape(-1)


def count_relevant(query_labels: ArrayLike, gallery_labels: ArrayLike, *, same_set: bool,
                   label_comparison_fn: Optional[Callable] = None) -> np.ndarray:
  """Number of gallery items relevant to each query (R).

  Args:
    query_labels: int [Q] ([Q, ...] with ``label_comparison_fn``).
    gallery_labels: int [G] ([G, ...] likewise).
    same_set: True when the gallery is the query set itself (leave-one-out):
      the query's own entry is then not counted.
    label_comparison_fn: as in ``relevance``; each unique query label is
      compared with the whole gallery, ``_LABEL_CHUNK`` labels at a time.

  Returns:
    int64 [Q].
  """
  query_labels = np.asarray(query_labels)
  gallery_labels = np.asarray(gallery_labels)
  if label_comparison_fn is None:
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    if len(uniq) == 0:
      rel = np.zeros(query_labels.shape, np.int64)
    else:
      pos = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
      rel = np.where(uniq[pos] == query_labels, counts[pos], 0).astype(np.int64)
    return rel - 1 if same_set else rel
  uniq, inverse = _unique_rows(query_labels)
  counts = np.zeros(len(uniq), np.int64)
  for start in range(0, len(uniq), _LABEL_CHUNK):
    part = uniq[start:start + _LABEL_CHUNK]
    counts[start:start + len(part)] = relevance(
        part, np.broadcast_to(gallery_labels[None], (len(part),) + gallery_labels.shape),
        label_comparison_fn).sum(1)
  if same_set:  # the query itself, where its label matches itself (as AccuracyCalculator)
    counts -= relevance(uniq, uniq[:, None], label_comparison_fn)[:, 0]
  return counts[inverse]


def first_hits(hits: ArrayLike) -> np.ndarray:
  """1-based rank of each row's first relevant neighbour, 0 without one: int64 [Q]."""
  hits = np.asarray(hits, bool)
  return np.where(hits.any(1), hits.argmax(1) + 1, 0).astype(np.int64)


def reciprocal_ranks(first_hit: ArrayLike, depth: int | None) -> np.ndarray:
  """1 / the first hit's rank if it is within ``depth``, else 0: float64 [Q]."""
  first_hit = np.asarray(first_hit, np.int64)
  found = (first_hit >= 1) & (first_hit <= depth)
  return np.where(found, 1.0 / np.maximum(first_hit, 1), 0.0)


def per_query(hits: np.ndarray, relevant_counts: np.ndarray, ks: Sequence[int],
              metrics: Sequence[str], *,
              depth: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Per-query metric values (float64 [Q] each) for later averaging.

  Args:
    hits: bool [Q, k], the relevance of each query's ranked neighbours
      (``relevance``).
    relevant_counts: [Q] R per query (``count_relevant``).
    ks: the K of ``recall@K``; every K <= k.
    metrics: names from ``METRICS``.
    depth: AccuracyCalculator's ``k``, how deep ``map``, ``mrr``,
      ``r_precision`` and ``map@r`` read (None: ``map`` and ``mrr`` read
      all k columns, ``r_precision`` and ``map@r`` need R). As there,
      ``map`` is the average precision over the top ``depth`` divided by R
      (the full mAP at the whole gallery's depth), ``mrr`` is 1 / the rank
      of the first hit within ``depth`` (0 without one), and a depth below
      R cuts ``r_precision`` to hits in the top ``min(R, depth)`` over
      ``min(R, depth)`` and ``map@r`` to the precisions there over R.

  Returns:
    ``(values, valid)``: ``{name: float64 [Q]}`` (``recall@K`` per K) and
    bool [Q], the queries with R > 0.
  """
  metrics, ks = check_metrics(metrics, ks)
  hits = np.asarray(hits, bool)
  rel = np.asarray(relevant_counts, np.int64)
  if hits.ndim != 2 or rel.shape != hits.shape[:1]:
    raise ValueError(f"Expected hits [Q, k] and relevant_counts [Q]; got {hits.shape}, "
                     f"{rel.shape}.")
  k = hits.shape[1]
  cut = depth is not None
  depth = k if depth is None else int(depth)
  if "recall" in metrics and max(ks) > k:
    raise ValueError(
        f"recall@{max(ks)} needs at least {max(ks)} neighbours per query but "
        f"the ranking has {k}; search with a larger k.")
  valid = rel > 0
  if any(m in NEEDS_R for m in metrics) and valid.any():
    need = min(int(rel[valid].max()), depth) if cut else int(rel[valid].max())
    if need > k:
      raise ValueError(
          f"r_precision / map@r need the top-R neighbours, R up to {need}, but "
          f"the ranking has only {k} columns; search with k >= {need}.")
  if depth > k and ("map" in metrics or "mrr" in metrics):
    raise ValueError(f"map / mrr read {depth} neighbours deep but the ranking has {k}; "
                     f"search with k >= {depth}.")
  ranks = np.arange(1, k + 1)
  out = {}
  first_hit = first_hits(hits)
  if "mrr" in metrics:
    out["mrr"] = reciprocal_ranks(first_hit, depth)
  if "recall" in metrics:
    for kk in ks:
      out[f"recall@{kk}"] = ((first_hit >= 1) & (first_hit <= kk)).astype(np.float64)
  r_cut = np.minimum(rel, depth) if cut else rel
  in_r = hits & (ranks[None, :] <= r_cut[:, None])
  if "r_precision" in metrics:
    out["r_precision"] = in_r.sum(1) / np.maximum(r_cut, 1)
  if "map@r" in metrics:
    prec = np.cumsum(in_r, 1) / ranks
    out["map@r"] = (prec * in_r).sum(1) / np.maximum(rel, 1)
  if "map" in metrics:
    in_depth = hits & (ranks[None, :] <= depth)
    prec = np.cumsum(in_depth, 1) / ranks
    out["map"] = (prec * in_depth).sum(1) / np.maximum(rel, 1)
  return out, valid


def custom_values(custom_metrics: dict, **inputs: Any) -> dict:
  """Each custom metric's per-query values: float64 [Q] per name.

  ``custom_metrics``: ``{name: fn}``, each called with keyword arguments
  ``hits`` (bool [Q, k]), ``neighbor_labels`` ([Q, k]), ``neighbor_indices``
  (int64 [Q, k]), ``query_labels`` ([Q]) and ``relevant_counts`` (int64
  [Q]), plus ``**kwargs`` it may ignore (AccuracyCalculator's
  ``calculate_*`` signature, one value per query instead of the average).
  """
  out = {}
  num = len(inputs["relevant_counts"])
  for name, fn in custom_metrics.items():
    value = np.asarray(fn(**inputs), np.float64)
    if value.shape != (num,):
      raise ValueError(f"custom metric {name!r} must return one value per query, float "
                       f"[{num}]; got shape {value.shape}.")
    out[name] = value
  return out


def nn_distances(queries: ArrayLike, nearest: ArrayLike) -> np.ndarray:
  """Euclidean distances between L2-normalised rows and their neighbours' [Q].

  `queries`, `nearest` [Q, D]; float32 [Q].
  """
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return np.linalg.norm(unit(np.asarray(queries, np.float32))
                        - unit(np.asarray(nearest, np.float32)), axis=1)


def average(values: Mapping[str, np.ndarray], valid: np.ndarray, *,
            labels: np.ndarray | None = None, avg_of_avgs: bool = False,
            return_per_class: bool = False) -> dict[str, float | list[float]]:
  """Averages of per-query values over the valid queries.

  Args:
    values: ``{name: float64 [Q]}``.
    valid: bool [Q], the queries with a relevant gallery item.
    labels: [Q] (or [Q, ...]) query labels, the classes of ``avg_of_avgs``
      and ``return_per_class``.
    avg_of_avgs: the mean over classes of each class's mean
      (AccuracyCalculator's option of the same name).
    return_per_class: each class's mean, a list in the order of
      ``np.unique(labels[valid], axis=0)``.

  Returns:
    ``{name: float or list of floats}``; NaN (per class: one NaN per unique
    query label) when no query is valid, as AccuracyCalculator.
  """
  valid = np.asarray(valid, bool)
  if not (avg_of_avgs or return_per_class):
    n = int(valid.sum())
    return {name: float(v[valid].sum() / n) if n else float("nan")
            for name, v in values.items()}
  labels = np.asarray(labels)
  if not valid.any():
    nan = [float("nan")] * len(_unique_rows(labels)[0]) if return_per_class else float("nan")
    return {name: nan for name in values}
  _, inverse = _unique_rows(labels[valid])
  sizes = np.bincount(inverse)
  out = {}
  for name, v in values.items():
    per_class = np.bincount(inverse, weights=np.asarray(v, np.float64)[valid]) / sizes
    out[name] = per_class.tolist() if return_per_class else float(per_class.mean())
  return out


def metrics_from_neighbors(neighbor_labels: ArrayLike, query_labels: ArrayLike,
                           relevant_counts: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8),
                           metrics: Sequence[str] = ("recall", "r_precision", "map@r"), *,
                           label_comparison_fn: Optional[Callable] = None) -> dict[str, float]:
  """Retrieval metrics from the labels of each query's ranked neighbours.

  Args:
    neighbor_labels: [Q, k] labels of the retrieved gallery items, best first
      (``gallery_labels[indices]`` from ``search``).
    query_labels: [Q] labels of the queries.
    relevant_counts: [Q] number of relevant gallery items per query, the
      query itself excluded in the same-set protocol (``count_relevant``).
      Queries with 0 are left out of the averages, as AccuracyCalculator does.
    ks: the K of recall@K; every K must be <= k.
    metrics: subset of ``("recall", "r_precision", "map@r", "map", "mrr")``,
      read to the depth given (AccuracyCalculator's with ``k`` columns).
      ``r_precision`` and ``map@r`` need k >= max R, else ValueError.
    label_comparison_fn: as in ``relevance``.

  Returns:
    dict with ``recall@K`` per K, ``r_precision``, ``map@r``, ``map``,
    ``mrr`` as requested; Python floats in [0, 1].
  """
  hits = relevance(query_labels, neighbor_labels, label_comparison_fn)
  values, valid = per_query(hits, relevant_counts, ks, metrics)
  return average(values, valid)
