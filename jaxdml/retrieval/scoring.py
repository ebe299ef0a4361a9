"""How `retrieval.evaluate` scores a search: AccuracyCalculator's options.

pytorch-metric-learning's `AccuracyCalculator` takes `k` (how deep its
k-NN reads: None, the whole reference set, by default), `avg_of_avgs`,
`return_per_class`, `label_comparison_fn`, `exclude` and `calculate_*`
extensions; `Request` holds the same choices, checked once, and
`Labelling` scores one labelling of the queries from the search's blocks.
Only MRR's deep first hits need more than the searched columns
(`deep_first_hits`: exact search for the queries that missed, never a
[Q, G] matrix).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence
import warnings

import jax
import numpy as np

from jaxdml.retrieval import exact
from jaxdml.retrieval import metrics as metrics_lib

_BUILTIN = metrics_lib.METRICS + metrics_lib.CLUSTER_METRICS + metrics_lib.EMBEDDING_METRICS


@dataclasses.dataclass(frozen=True)
class Request:
  """What to compute: metric names (after `exclude`) and the options."""
  ranked: tuple  # from metrics.METRICS: read off the ranking
  ks: tuple
  clusters: tuple  # nmi, ami
  nn_distance: bool
  custom: dict
  avg_of_avgs: bool = False
  return_per_class: bool = False
  label_comparison_fn: Optional[Callable] = None

  @property
  def reads_depth(self) -> bool:
    """Whether some metric reads the ranking `k` deep (not only its first hit)."""
    return "map" in self.ranked or bool(self.custom)

  @property
  def needs_ranking(self) -> bool:
    """Whether any metric reads the ranked neighbours, so a search is needed."""
    return bool(self.ranked or self.custom or self.nn_distance)


def request(metrics: Sequence[str], ks: Sequence[int], *, exclude: Sequence[str] = (),
            custom_metrics: Mapping[str, Callable[..., Any]] | None = None,
            avg_of_avgs: bool = False, return_per_class: bool = False,
            label_comparison_fn: Callable[..., Any] | None = None) -> Request:
  """Checks `evaluate`'s metric choices; one clear error per mistake."""
  custom = dict(custom_metrics or {})
  for name, fn in custom.items():
    if not isinstance(name, str) or name in _BUILTIN or name.startswith("recall@"):
      raise ValueError(f"custom metric name {name!r} must be a string other than the "
                       f"built-in names {_BUILTIN} and recall@K.")
    if not callable(fn):
      raise ValueError(f"custom metric {name!r} must be a function of the per-query "
                       f"neighbours (see evaluate); got {type(fn).__name__}.")
  names, ks = metrics_lib.check_metrics(metrics, ks, allow_empty=bool(custom))
  exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  unknown = [m for m in exclude if m not in _BUILTIN + tuple(custom)]
  if unknown:
    raise ValueError(f"exclude names unknown metrics {unknown}; choose from "
                     f"{_BUILTIN + tuple(custom)}.")
  names = tuple(m for m in names if m not in exclude)
  if avg_of_avgs and return_per_class:
    raise ValueError("avg_of_avgs and return_per_class are mutually exclusive (as in "
                     "AccuracyCalculator); pass one.")
  clusters = tuple(m for m in names if m in metrics_lib.CLUSTER_METRICS)
  if clusters and label_comparison_fn is not None:
    raise ValueError(f"{list(clusters)} score k-means clusters against label values, which a "
                     "label_comparison_fn does not define (AccuracyCalculator refuses it too); "
                     "exclude them or drop label_comparison_fn.")
  return Request(ranked=tuple(m for m in names if m in metrics_lib.METRICS), ks=ks,
                 clusters=clusters, nn_distance="nn_distance" in names,
                 custom={n: f for n, f in custom.items() if n not in exclude},
                 avg_of_avgs=bool(avg_of_avgs), return_per_class=bool(return_per_class),
                 label_comparison_fn=label_comparison_fn)


def check_labels(name: str, embeddings: np.ndarray, labels: np.ndarray,
                 label_comparison_fn: Callable[..., Any] | None) -> None:
  """ValueError unless `labels` has one row per embedding: [N], or [N, ...] with a
  `label_comparison_fn`."""
  num = embeddings.shape[0]
  if label_comparison_fn is None and labels.shape != (num,):
    raise ValueError(f"{name}_labels must have shape [{num}] to match {name}_embeddings "
                     f"(labels [N, ...] need a label_comparison_fn), got {labels.shape}.")
  if labels.ndim == 0 or labels.shape[0] != num:
    raise ValueError(f"{name}_labels must have {num} rows to match {name}_embeddings, got "
                     f"shape {labels.shape}.")


def depth(k: int | str | None, relevant_counts: np.ndarray, available: int) -> int:
  """AccuracyCalculator's `k` as a depth: None the whole gallery
  (`available`), "max_bin_count" the largest R, or a positive int.

  `relevant_counts` int [Q].
  """
  if k is None:
    return available
  if isinstance(k, str) and k == "max_bin_count":
    return max(1, int(np.max(relevant_counts, initial=0)))
  if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0:
    if k > available:
      raise ValueError(f"k={k} is deeper than the {available} gallery items a query can see; "
                       "pass k=None for the whole gallery.")
    return int(k)
  raise ValueError(f"k={k!r}: pass None (the whole gallery, AccuracyCalculator's default), "
                   "'max_bin_count' (the largest relevant count) or a positive int.")


def warn_if_short(k: int | str | None, req: Request, largest_r: int) -> None:
  """AccuracyCalculator's warning: an int k below R cuts r_precision and map@r."""
  if (isinstance(k, (int, np.integer)) and k < largest_r
      and any(m in metrics_lib.NEEDS_R for m in req.ranked)):
    warnings.warn(f"k={k} is below the largest relevant count R={largest_r}: r_precision and "
                  f"map@r read only the top {k}, as AccuracyCalculator does (it warns too); "
                  "k='max_bin_count' reads them whole.", stacklevel=3)


def search_depth(req: Request, largest_r: int, depth_: int, available: int) -> int:
  """Neighbours one labelling needs from the search: max(ks), R up to the
  depth, the depth where a metric reads it; MRR needs none (its deep first
  hits come from `deep_first_hits`)."""
  need = max(max(req.ks) if "recall" in req.ranked else 1,
             min(largest_r, depth_) if any(m in metrics_lib.NEEDS_R for m in req.ranked)
             else 1,
             depth_ if req.reads_depth else 1)
  return max(1, min(need, available))


class Labelling:
  """One labelling's per-query values, gathered block by block."""

  def __init__(self, req: Request, query_labels, gallery_labels, relevant_counts, depth_: int):
    self.req, self.depth = req, depth_
    self.query_labels, self.gallery_labels = query_labels, gallery_labels
    self.relevant_counts = relevant_counts
    self.first = np.zeros(len(query_labels), np.int64)  # 0: no hit in the searched columns
    self.chunks = []

  def add(self, start: int, scores: np.ndarray, indices: np.ndarray) -> None:
    """Scores a block of queries from their ranked neighbours [b, searched].

    Scores float32 and indices int64, [b, searched].
    """
    end = start + indices.shape[0]
    req, d = self.req, self.depth
    hits = metrics_lib.relevance(self.query_labels[start:end], self.gallery_labels[indices],
                                 req.label_comparison_fn)
    rel = self.relevant_counts[start:end]
    self.first[start:end] = metrics_lib.first_hits(hits)
    values = {}
    plain = tuple(m for m in req.ranked if m != "mrr")
    if plain:
      values, _ = metrics_lib.per_query(hits, rel, req.ks, plain, depth=d)
    if req.custom:
      values.update(metrics_lib.custom_values(
          req.custom, hits=hits[:, :d], neighbor_labels=self.gallery_labels[indices[:, :d]],
          neighbor_indices=indices[:, :d], neighbor_scores=np.asarray(scores)[:, :d],
          query_labels=self.query_labels[start:end], relevant_counts=rel))
    self.chunks.append(values)

  def result(self, first_hit_ranks: np.ndarray | None = None) -> dict:
    """Averages (per class as asked); `first_hit_ranks`: every query's
    first-hit rank at full depth, for `mrr` (`deep_first_hits`).

    `first_hit_ranks` int64 [Q], 1-based (0: none).
    """
    names = self.chunks[0] if self.chunks else {}
    values = {name: np.concatenate([c[name] for c in self.chunks]) for name in names}
    if "mrr" in self.req.ranked:
      values["mrr"] = metrics_lib.reciprocal_ranks(first_hit_ranks, self.depth)
    return metrics_lib.average(values, self.relevant_counts > 0, labels=self.query_labels,
                               avg_of_avgs=self.req.avg_of_avgs,
                               return_per_class=self.req.return_per_class)

  def deep_first_hits(self, searched: int, query: np.ndarray, gallery: np.ndarray, *,
                      same_set: bool, similarity: str,
                      mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """Each query's first-hit rank (0: none relevant): the searched columns'
    where they hold one; else, where the depth reaches past them, exact
    search over the whole gallery for those queries only.

    `query` [Q, D], `gallery` [G, D] float32; returns int64 [Q].
    """
    first = self.first.copy()
    if searched >= self.depth:
      return first
    missed = np.flatnonzero((first == 0) & (self.relevant_counts > 0))
    if len(missed) == 0:
      return first
    self_rows = missed if same_set else None
    q_labels, g_labels = self.query_labels[missed], self.gallery_labels
    if self.req.label_comparison_fn is None:
      ranks = exact.first_hit_ranks(query[missed], gallery, q_labels, g_labels,
                                    self_rows=self_rows, similarity=similarity, mesh=mesh)
    else:
      relevant = lambda rows: metrics_lib.relevance(
          q_labels[rows], np.broadcast_to(g_labels[None], (len(rows),) + g_labels.shape),
          self.req.label_comparison_fn)
      ranks = exact.first_hit_ranks_numpy(query[missed], gallery, relevant,
                                          self_rows=self_rows, similarity=similarity)
    # They missed the searched columns: a rounding difference between the
    # two scorings must not put them back inside.
    first[missed] = np.where(ranks > 0, np.maximum(ranks, searched + 1), 0)
    return first
