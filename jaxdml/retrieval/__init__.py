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
"""
import jax
from jax.experimental import multihost_utils
import numpy as np

from jaxdml.retrieval import clustering
from jaxdml.retrieval import exact
from jaxdml.retrieval import metrics as metrics_lib
from jaxdml.retrieval import scann_backend
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


def search(query, gallery, k, *, exclude_self=False, backend="exact",
           similarity="cosine", scann_config=None, mesh=None):
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


def search_and_audit(query, gallery, k, *, exclude_self=False, backend="exact",
                     similarity="cosine", scann_config=None, mesh=None, labels=None):
  """``search``, plus ScaNN's audit report (``scann/...``, empty for exact).

  ``labels``: ``(query_labels, gallery_labels)`` make the audit's target the
  recall an evaluation reports; without them the exact neighbours are the
  truth (``scann_backend.audit``).
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


def evaluate(query_embeddings, query_labels, gallery_embeddings=None,
             gallery_labels=None, *, ks=(1, 2, 4, 8), backend="exact",
             metrics=("recall", "r_precision", "map@r", "mrr"), scann_config=None,
             similarity="cosine", mesh=None, exclude_self=None, label_sets=None):
  """Retrieval metrics of queries against a gallery.

  Args:
    query_embeddings, query_labels: [Q, D] and int [Q].
    gallery_embeddings, gallery_labels: [G, D] and int [G]; both None for
      the same-set leave-one-out protocol (each query excluded from its own
      results by index), as for CUB, Cars and SOP.
    ks: the K of ``recall@K``.
    backend, similarity, scann_config, mesh: as in ``search``.
    metrics: subset of ``("recall", "r_precision", "map@r", "map", "mrr",
      "nmi", "ami", "nn_distance")``; see ``metrics_from_neighbors``.
      ``"map"`` ranks the whole gallery, so it needs ``backend="exact"`` and
      costs a full sort per query. ``"mrr"`` looks as deep as
      AccuracyCalculator's default k: the largest gallery class (minus the
      query itself in the same-set protocol). ``"nmi"`` and ``"ami"`` score
      a k-means clustering of the queries against their labels
      (``retrieval.clustering``; off by default: k-means over many classes
      is slow). ``"nn_distance"`` is the mean distance from a query to its
      nearest gallery item after L2 normalisation (how spread out the
      embeddings are; KoLeo should raise it), over every query.
    exclude_self: the gallery is the query set, row i of both item i, each
      query excluded from its own results by index; default: when no
      gallery is given. True with a gallery is the same set embedded
      another way (a teacher's embeddings of the queries' images).
    label_sets: more labellings of the same items, ``{prefix: (query_labels,
      gallery_labels)}``, each scored from the same search and reported
      under its prefix (Sketchy's instance hits and ``"category/"`` hits).

  Returns:
    dict: ``recall@K`` per K, ``r_precision``, ``map@r``, ``map``, ``mrr`` as asked,
    averaged over the queries with at least one relevant gallery item;
    with ``backend="scann"`` also the audit report (``scann/...``).

  The search depth is k = max(max(ks), max R) with R the relevant count per
  query (what AccuracyCalculator's ``k="max_bin_count"`` does), capped at
  the gallery size. There is no further cap: results are consumed block by
  block, so memory stays at [block, k] whatever the largest class.
  """
  metric_names, ks = metrics_lib.check_metrics(metrics, ks)
  cluster_names = [m for m in metric_names if m in metrics_lib.CLUSTER_METRICS]
  nn_distance = "nn_distance" in metric_names
  metric_names = tuple(m for m in metric_names
                       if m not in metrics_lib.CLUSTER_METRICS and m != "nn_distance")
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
  for name, emb, lab in (("query", query_embeddings, query_labels),
                         ("gallery", gallery_embeddings, gallery_labels)):
    if lab.shape != (emb.shape[0],):
      raise ValueError(f"{name}_labels must have shape [{emb.shape[0]}] to "
                       f"match {name}_embeddings, got {lab.shape}.")
  labellings = {"": (query_labels, gallery_labels)}
  for prefix, (q_lab, g_lab) in (label_sets or {}).items():
    labellings[prefix] = (np.asarray(q_lab), np.asarray(g_lab))
  results = {}
  if cluster_names:
    scores = clustering.cluster_scores(query_embeddings, query_labels)
    results.update({m: scores[m] for m in cluster_names})
  if not (metric_names or nn_distance):
    return results
  rel = {p: count_relevant(q, g, same_set=same_set) for p, (q, g) in labellings.items()}
  available = gallery_embeddings.shape[0] - int(same_set)
  if "recall" in metric_names and max(ks) > available:
    raise ValueError(f"recall@{max(ks)} needs {max(ks)} neighbours but the "
                     f"gallery offers {available}; lower ks.")
  mrr_depth = None
  if "mrr" in metric_names:
    mrr_depth = max(1, min(int(np.unique(gallery_labels, return_counts=True)[1].max())
                           - int(same_set), available))
  if "map" in metric_names:
    if backend != "exact":
      raise ValueError("metric 'map' ranks the whole gallery: use "
                       "backend='exact', or drop 'map' for backend='scann'.")
    k = available
  else:
    need_r = any(m in metrics_lib.NEEDS_R for m in metric_names)
    k = max(max(ks) if "recall" in metric_names else 1,
            max(int(r.max()) for r in rel.values()) if need_r else 1, mrr_depth or 1)
    k = max(1, min(k, available))
  if backend == "exact":
    blocks = exact.search_blocks(query_embeddings, gallery_embeddings, k,
                                 exclude_self=same_set, similarity=similarity,
                                 mesh=mesh)
  else:
    _, idx, report = search_and_audit(
        query_embeddings, gallery_embeddings, k, exclude_self=same_set, backend=backend,
        similarity=similarity, scann_config=scann_config,
        labels=(query_labels, gallery_labels))
    results.update(report)
    blocks = [(0, None, idx)]
  parts = {p: [] for p in labellings}
  nn_sum = 0.0
  for start, _, idx in blocks:
    end = start + idx.shape[0]
    for prefix, (q_lab, g_lab) in labellings.items():
      if metric_names:
        values, _ = metrics_lib.per_query(g_lab[idx], q_lab[start:end], rel[prefix][start:end],
                                          ks, metric_names, mrr_depth=mrr_depth)
        parts[prefix].append(values)
    if nn_distance:
      nn_sum += metrics_lib.nn_distances(query_embeddings[start:end],
                                         gallery_embeddings[idx[:, 0]]).sum()
  for prefix, chunks in parts.items():
    if chunks:
      values = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
      results.update({prefix + name: value for name, value
                      in metrics_lib.average(values, rel[prefix] > 0).items()})
  if nn_distance:
    results["nn_distance"] = float(nn_sum / query_embeddings.shape[0])
  return results
