"""Retrieval evaluation: nearest-neighbour search, metrics, pictures.

Protocols:
- same set, leave-one-out (CUB, Cars, SOP): ``evaluate(emb, labels)``;
- query -> gallery (In-Shop, DeepFashion2):
  ``evaluate(q, q_labels, g, g_labels)``;
- sketch -> photo with instance and category hits (Sketchy): one ``search``,
  then ``metrics_from_neighbors`` once per label set, with
  ``count_relevant`` giving each label set's R.

``Index`` is an index over one's own embeddings: built once, then searched,
grown, matched against, saved and loaded (``retrieval/index.py``).

``evaluate`` computes pytorch-metric-learning's ``AccuracyCalculator``
metrics with its options (``k``, ``avg_of_avgs``, ``return_per_class``,
``label_comparison_fn``, ``exclude``, custom metrics; ``scoring``) from one
search consumed block by block.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from numpy.typing import ArrayLike

from jaxdml.retrieval import clustering
from jaxdml.retrieval import exact
from jaxdml.retrieval import metrics as metrics_lib
from jaxdml.retrieval import scann_backend
from jaxdml.retrieval import rerank_spec
from jaxdml.retrieval import scoring
from jaxdml.retrieval.index import Index
from jaxdml.retrieval.metrics import count_relevant
from jaxdml.retrieval.metrics import metrics_from_neighbors
from jaxdml.retrieval.picture import save_retrieval_grid

__all__ = ["Index", "evaluate", "search", "search_and_audit", "metrics_from_neighbors", "count_relevant",
           "save_retrieval_grid", "BACKENDS"]

BACKENDS = ("exact", "scann")


def _check_embeddings(name, x):
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"{name} must be a numeric [N, D] array, got shape "
                     f"{x.shape} dtype {x.dtype}.")
  if x.shape[0] == 0:
    raise ValueError(f"{name} is empty.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has NaN or inf values; fix the embedding model "
                     "or drop those rows before retrieval.")
  return x


def search(query: ArrayLike, gallery: ArrayLike, k: int, *, exclude_self: bool = False,
           backend: str = "exact", similarity: str = "cosine",
           scann_config: Mapping[str, Any] | None = None,
           mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery items for each query, best first.

  One search: ``backend="scann"`` builds (and audits) a ScaNN searcher for
  this call, as an evaluation wants. ``Index`` is the reusable one: built
  once, searched many times, grown, saved and loaded.

  ``search_and_audit`` is the same search that also returns ScaNN's recall
  audit (`scann_backend.audit`).

  Args:
    query: [Q, D] embeddings.
    gallery: [G, D] embeddings.
    k: neighbours per query, 1 <= k <= G (G - 1 with ``exclude_self``).
    exclude_self: queries and gallery are the same set (row i of both is
      item i): item i is removed from query i's results by index, so exact
      duplicates of the query are still returned.
    backend: ``"exact"`` (JAX, blocked and sharded over ``mesh``) or
      ``"scann"`` (approximate; settings from the gallery size, overridden
      by ``scann_config``, see ``scann_backend.default_config``).
    similarity: ``"cosine"`` (rows L2-normalised, then inner product),
      ``"dot"``, or ``"euclidean"`` (score = minus the squared distance).
    scann_config: dict of ScaNN settings; ignored by the exact backend, so
      one config can switch backends.
    mesh: 1-D mesh with axis ``data`` for the exact backend; default all
      local devices. The gallery is sharded over it.

  Returns:
    ``(scores float32 [Q, k], indices int64 [Q, k])`` as numpy; larger score
    is better. Exact ties go to the lower gallery index (faiss, used by
    AccuracyCalculator, may order ties differently).
  """
  scores, indices, _ = search_and_audit(
      query, gallery, k, exclude_self=exclude_self, backend=backend,
      similarity=similarity, scann_config=scann_config, mesh=mesh)
  return scores, indices


def search_and_audit(query: ArrayLike, gallery: ArrayLike, k: int, *, exclude_self: bool = False,
                     backend: str = "exact", similarity: str = "cosine",
                     scann_config: Mapping[str, Any] | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     labels: tuple[ArrayLike, ArrayLike] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """``search``, plus ScaNN's audit report (``scann/...``, empty for exact).

  ``labels``: ``(query_labels, gallery_labels)`` make the audit's target the
  recall an evaluation reports; without them the exact neighbours are the
  truth (``scann_backend.audit``).

  Returns `(scores float32 [Q, k], indices int64 [Q, k], report)`.
  """
  query = _check_embeddings("query", query)
  gallery = _check_embeddings("gallery", gallery)
  if query.shape[1] != gallery.shape[1]:
    raise ValueError(f"query dim {query.shape[1]} != gallery dim "
                     f"{gallery.shape[1]}; embed both with the same head.")
  if exclude_self and query.shape[0] != gallery.shape[0]:
    raise ValueError("exclude_self=True needs query and gallery to be the same "
                     f"set, got {query.shape[0]} and {gallery.shape[0]} rows.")
  available = gallery.shape[0] - int(bool(exclude_self))
  if not 1 <= int(k) <= available:
    raise ValueError(f"k={k} must be in [1, {available}] (gallery size"
                     f"{' minus the query itself' if exclude_self else ''}).")
  if similarity not in exact.SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}; choose from "
                     f"{exact.SIMILARITIES}.")
  if backend == "exact":
    return (*exact.search(query, gallery, int(k), exclude_self=exclude_self,
                          similarity=similarity, mesh=mesh), {})
  if backend == "scann":
    run = lambda: scann_backend.search(query, gallery, int(k), exclude_self=exclude_self,
                                       similarity=similarity, scann_config=scann_config,
                                       labels=labels)
    return run() if jax.process_count() == 1 else _on_process_0(run, query.shape[0], int(k))
  raise ValueError(f"backend={backend!r}; choose from {BACKENDS}.")


def _on_process_0(run, num_queries: int, k: int):
  """On several processes one ScaNN index is enough: process 0 builds and
  searches it, the others receive its [Q, k] results and audit report (a
  broadcast), where every process would otherwise build the same index."""
  if jax.process_index() == 0:
    scores, indices, report = run()
  else:
    scores, indices, report = np.zeros((num_queries, k), np.float32), np.zeros((num_queries, k)), {}
  # The report's keys depend on k and the audit, which every process shares.
  names = sorted(report) if jax.process_index() == 0 else []
  names = _broadcast_names(names)
  values = np.array([float(report.get(n, 0.0)) for n in names], np.float64)
  scores, indices, values = multihost_utils.broadcast_one_to_all(
      (np.asarray(scores, np.float32), np.asarray(indices, np.int32), values))
  return (np.asarray(scores), np.asarray(indices, np.int64),
          dict(zip(names, np.asarray(values).tolist())))


def _broadcast_names(names: list, size: int = 4096) -> list:
  """Process 0's list of short strings, on every process (fixed-size bytes:
  a broadcast needs the same shape everywhere)."""
  data = "\n".join(names).encode()
  if len(data) > size:
    raise ValueError(f"{len(data)} bytes of names; at most {size} are broadcast.")
  buffer = np.zeros(size, np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
  text = received.tobytes().rstrip(b"\0").decode()
  return text.split("\n") if text else []


def evaluate(query_embeddings: ArrayLike, query_labels: ArrayLike,
             gallery_embeddings: ArrayLike | None = None, gallery_labels: ArrayLike | None = None,
             *, ks: Sequence[int] = (1, 2, 4, 8), backend: str = "exact",
             metrics: Sequence[str] = ("recall", "r_precision", "map@r", "mrr"),
             scann_config: Mapping[str, Any] | None = None, similarity: str = "cosine",
             mesh: jax.sharding.Mesh | None = None, exclude_self: bool | None = None,
             label_sets: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
             k: int | str | None = None, exclude: Sequence[str] = (), avg_of_avgs: bool = False,
             return_per_class: bool = False, label_comparison_fn: Callable[..., Any] | None = None,
             custom_metrics: Mapping[str, Callable[..., Any]] | None = None, kmeans_seed: int = 0,
             rerank: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Retrieval metrics of queries against a gallery.

  With the exact backend the values equal pytorch-metric-learning's
  ``AccuracyCalculator`` (2.9.0, faiss k-NN) given the same arrays, options
  and ``k`` (``tests/test_accuracy_calculator.py``), up to the order of exact
  ties between items of different relevance (ours: lower gallery index
  first).

  Args:
    query_embeddings, query_labels: [Q, D] and int [Q].
    gallery_embeddings, gallery_labels: [G, D] and int [G]; both None for
      the same-set leave-one-out protocol (each query excluded from its own
      results by index), as for CUB, Cars and SOP.
    ks: the K of ``recall@K``.
    backend, similarity, scann_config, mesh: as in ``search``. With
      ``"scann"`` the neighbours are approximate: every metric reads
      ScaNN's ranking, except ``mrr``'s first hits beyond the searched
      depth, which come from exact search.
    metrics: subset of ``("recall", "r_precision", "map@r", "map", "mrr",
      "nmi", "ami", "nn_distance")``; see ``metrics.per_query``.
      ``"nmi"`` and ``"ami"`` score a k-means clustering of the queries
      against their labels (``retrieval.clustering``, seeded by
      ``kmeans_seed``; off by default: k-means over many classes is slow).
      ``"nn_distance"`` is the mean distance from a query to its nearest
      gallery item after L2 normalisation (how spread out the embeddings
      are; KoLeo should raise it), over every query.
    exclude_self: the gallery is the query set, row i of both item i, each
      query excluded from its own results by index; default: when no
      gallery is given. True with a gallery is the same set embedded
      another way (a teacher's embeddings of the queries' images).
    label_sets: more labellings of the same items, ``{prefix: (query_labels,
      gallery_labels)}``, each scored from the same search and reported
      under its prefix (Sketchy's instance hits and ``"category/"`` hits).
    k: AccuracyCalculator's ``k``, how deep ``map``, ``mrr`` and custom
      metrics read: None (its default) the whole gallery, minus the query
      itself in the same-set protocol; ``"max_bin_count"`` the largest R;
      or an int. ``map`` at the whole depth is the full mAP and ranks the
      whole gallery (exact backend only); ``mrr`` at any depth finds each
      query's first hit beyond the search by two more passes over the
      gallery for those queries only (``exact.first_hit_ranks``). An int
      below the largest R cuts ``r_precision`` and ``map@r`` short, as
      there (with the same warning). ``ks`` is independent of it.
    exclude: names of metrics (built-in or custom) not to compute.
    avg_of_avgs: each metric averaged per query class, then over the
      classes; ``return_per_class``: the per-class averages as a list in the
      order of ``np.unique(labels, axis=0)`` over the queries with a
      relevant item (a list of NaN, one per query label, when none has).
      Mutually exclusive, as there; ``nmi``, ``ami`` and ``nn_distance``
      stay single numbers.
    label_comparison_fn: AccuracyCalculator's custom relevance, a predicate
      over numpy labels that broadcasts: ``fn(query_labels[:, None],
      neighbor_labels)`` -> bool [Q, k] (labels may then be [N, ...],
      e.g. hierarchical ``lambda a, b: a[..., 0] == b[..., 0]``). R per
      query is its number of relevant gallery items, minus the query
      itself in the same-set protocol where its label matches itself.
      Unsupported with ``nmi``/``ami`` (as there); ``mrr``'s deep first
      hits are then scored on the host (``exact.first_hit_ranks_numpy``).
    custom_metrics: ``{name: fn}``, AccuracyCalculator's ``calculate_*``
      extension as per-query functions: ``fn(*, hits, neighbor_labels,
      neighbor_indices, neighbor_scores, query_labels, relevant_counts,
      **kwargs) -> float [b]`` for a block of b queries, each neighbour
      array [b, depth] best first (``hits``: bool relevance, scores: larger
      is better), ``relevant_counts`` int64 [b] (R). Averaged like the
      built-in metrics (over the queries with R > 0, per class as asked);
      one result per labelling. They read ``k`` deep, so ``k=None``
      ranks the whole gallery: pass ``k`` to bound it.
    kmeans_seed: the seed of the k-means of ``nmi`` and ``ami``.
    rerank: None, or a re-ranking spec (``rerank_spec.check``: ``{"name":
      "alpha_qe" | "dba" | "k_reciprocal", **hyperparameters, "depth":
      first-search candidates}``): the search fetches ``depth`` candidates
      (at least the depth the metrics read), the method reorders them and
      every ranked metric reads the reordered lists. ``nn_distance`` and
      ``mrr``'s first hits beyond the lists stay the first search's.

  Returns:
    dict: ``recall@K`` per K, ``r_precision``, ``map@r``, ``map``, ``mrr``,
    the custom metrics, ``nmi``, ``ami``, ``nn_distance`` as asked
    (floats, or per-class lists with ``return_per_class``), averaged over
    the queries with at least one relevant gallery item; with
    ``backend="scann"`` also the audit report (``scann/...``).

  The search depth is the largest of max(ks), R per query (capped at the
  depth ``k``) and ``k`` itself where ``map`` or a custom metric reads
  it, capped at the gallery size. Results are consumed block by block, so
  memory stays at [block, depth] whatever the largest class.
  """
  req = scoring.request(metrics, ks, exclude=exclude, custom_metrics=custom_metrics,
                        avg_of_avgs=avg_of_avgs, return_per_class=return_per_class,
                        label_comparison_fn=label_comparison_fn)
  rerank = rerank_spec.check(rerank, similarity)
  if (gallery_embeddings is None) != (gallery_labels is None):
    raise ValueError("Pass gallery_embeddings and gallery_labels together, or "
                     "neither for the same-set protocol.")
  query_embeddings = _check_embeddings("query_embeddings", query_embeddings)
  query_labels = np.asarray(query_labels)
  if gallery_embeddings is None:
    gallery_embeddings, gallery_labels = query_embeddings, query_labels
    exclude_self = True if exclude_self is None else exclude_self
  same_set = bool(exclude_self)
  gallery_embeddings = _check_embeddings("gallery_embeddings",
                                         gallery_embeddings)
  gallery_labels = np.asarray(gallery_labels)
  if same_set and gallery_embeddings.shape[0] != query_embeddings.shape[0]:
    raise ValueError("exclude_self=True needs the gallery to be the query set (row i of "
                     f"both item i); got {query_embeddings.shape[0]} and "
                     f"{gallery_embeddings.shape[0]} rows.")
  label_pairs = {"": (query_labels, gallery_labels)}
  for prefix, (q_lab, g_lab) in (label_sets or {}).items():
    label_pairs[prefix] = (np.asarray(q_lab), np.asarray(g_lab))
  for prefix, (q_lab, g_lab) in label_pairs.items():
    scoring.check_labels(f"{prefix}query", query_embeddings, q_lab, label_comparison_fn)
    scoring.check_labels(f"{prefix}gallery", gallery_embeddings, g_lab, label_comparison_fn)
  results = {}
  if req.clusters:
    scores = clustering.cluster_scores(query_embeddings, query_labels, seed=kmeans_seed)
    results.update({m: scores[m] for m in req.clusters})
  if not req.needs_ranking:
    return results
  available = gallery_embeddings.shape[0] - int(same_set)
  if "recall" in req.ranked and max(req.ks) > available:
    raise ValueError(f"recall@{max(req.ks)} needs {max(req.ks)} neighbours but the "
                     f"gallery offers {available}; lower ks.")
  labellings, search_k = {}, 1
  for prefix, (q_lab, g_lab) in label_pairs.items():
    rel = count_relevant(q_lab, g_lab, same_set=same_set, label_comparison_fn=label_comparison_fn)
    largest_r = int(rel.max())
    d = scoring.depth(k, rel, available)
    scoring.warn_if_short(k, req, largest_r)
    if req.reads_depth and backend != "exact" and d == available:
      raise ValueError("metric 'map' and custom metrics read k deep, and k=None ranks the "
                       "whole gallery: use backend='exact', or pass an int k (or "
                       "'max_bin_count').")
    labellings[prefix] = scoring.Labelling(req, q_lab, g_lab, rel, d)
    search_k = max(search_k, scoring.search_depth(req, largest_r, d, available))
  if rerank is not None:
    blocks, results_ = _reranked(rerank, query_embeddings, gallery_embeddings, search_k,
                                 available, same_set=same_set, backend=backend,
                                 similarity=similarity, scann_config=scann_config, mesh=mesh,
                                 labels=(query_labels, gallery_labels))
    results.update(results_)
  elif backend == "exact":
    blocks = exact.search_blocks(query_embeddings, gallery_embeddings, search_k,
                                 exclude_self=same_set, similarity=similarity,
                                 mesh=mesh)
  else:
    scores, idx, report = search_and_audit(
        query_embeddings, gallery_embeddings, search_k, exclude_self=same_set,
        backend=backend, similarity=similarity, scann_config=scann_config,
        labels=(query_labels, gallery_labels))
    results.update(report)
    blocks = [(0, scores, idx)]
  nn_sum = 0.0
  for start, scores, idx, *first in blocks:
    if req.ranked or req.custom:
      for labelling in labellings.values():
        labelling.add(start, scores, idx)
    if req.nn_distance:  # the nearest item: the first search's top 1 under re-ranking
      nearest = first[0] if first else idx[:, 0]
      nn_sum += metrics_lib.nn_distances(query_embeddings[start:start + idx.shape[0]],
                                         gallery_embeddings[nearest]).sum()
  for prefix, labelling in labellings.items():
    first = None
    if "mrr" in req.ranked:
      first = labelling.deep_first_hits(search_k, query_embeddings, gallery_embeddings,
                                        same_set=same_set, similarity=similarity, mesh=mesh)
    results.update({prefix + name: value for name, value in labelling.result(first).items()})
  if req.nn_distance:
    results["nn_distance"] = float(nn_sum / query_embeddings.shape[0])
  return results


def _reranked(spec, query, gallery, k, available, *, same_set, backend, similarity,
              scann_config, mesh, labels):
  """`evaluate`'s blocks under re-ranking: one search `rerank_spec.depth` deep
  on `backend`, reordered by `spec`, cut to the `k` the metrics read, with
  the first search's top 1 beside (for `nn_distance`); and ScaNN's audit."""
  def search_fn(q, g, depth_, exclude_self):
    return search(q, g, depth_, exclude_self=exclude_self, backend=backend,
                  similarity=similarity, scann_config=scann_config, mesh=mesh)
  scores, idx, report = search_and_audit(
      query, gallery, rerank_spec.depth(spec, k, available), exclude_self=same_set,
      backend=backend, similarity=similarity, scann_config=scann_config, mesh=mesh,
      labels=labels)
  # One set (leave-one-out): k-reciprocal's graph has each item once. The
  # same items embedded another way (a teacher's gallery) are two sets.
  one_set = same_set and (gallery is query or np.array_equal(gallery, query))
  reordered, order = rerank_spec.apply(spec, query, gallery, idx, search=search_fn,
                                     same_set=one_set, similarity=similarity)
  return [(0, reordered[:, :k], order[:, :k], idx[:, 0])], report
