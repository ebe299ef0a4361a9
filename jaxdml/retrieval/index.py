"""An index over your own embeddings: built once, searched, grown, saved.

    from jaxdml.retrieval import Index
    index = Index.build(embeddings)                  # float [N, D]; no config
    scores, ids = index.search(queries, k=10)        # [Q, 10] each, best first
    index.add(more)                                  # appends rows N, N+1, ...
    index.save("my.index")                           # a folder, or gs://bucket/my.index
    index = Index.load("my.index")
    found = index.match(queries, threshold=0.9)      # found.matched, found.ids, found.scores

Search: "exact" is `jaxdml.retrieval.exact` (JAX, blocked, sharded over the
local devices); "scann" is a ScaNN searcher built once (`scann_backend`,
its settings from the size, overridden by `scann_config`) and audited
(`scann_backend.audit`): a sample of the indexed rows, used as queries,
must find their exact 10 nearest neighbours (recall@1 and @10 within
`audit_max_gap` points, 0.1), else the search deepens; where no setting
meets it the index searches exactly (and stays exact as it grows). "auto"
is exact below `scann_backend.BRUTE_FORCE_BELOW` rows, ScaNN from there
on. `retrieval.search(backend="scann")` is the one-shot search of an
evaluation (a new searcher per call); this is the reusable one.

Scores (larger is better): cosine in [-1, 1] (1: the same direction),
dot the inner product, euclidean minus the squared distance (0: the same
point), as `retrieval.search`.

Adding: an exact index just grows. A ScaNN index searches the rows added
since its searcher was built exactly and merges them into the searcher's
results, so they are found as an exact index finds them; once they pass
`REBUILD_FRACTION` (a tenth) of the rows the searcher holds, it is rebuilt
over every row and audited again. A tenth: the exact part of a search
then scores as many rows as the tree's part does at its default depth (a
tenth of the leaves), so a search slows by at most about 2x before the
rebuild, and a rebuild is paid once per 10 % of growth.

On disk (`Index.save`, `read`; a folder or a URL through `jaxdml.paths`):
`embeddings.npy` (float32 [N, D], as given), `ids.npy` (int64 [N], only
when ids were given), `scann/` (the serialized searcher) and
`manifest.json` (format, count, dim, similarity, backend, ScaNN's settings
and audit, and every file's size and sha256), written and checked by
`index_files`: an interrupted save never leaves an index that loads, and a
damaged or mixed one fails to load with the file it found wrong.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from absl import logging
import numpy as np
from numpy.typing import ArrayLike

from jaxdml.retrieval import exact
from jaxdml.retrieval import index_files
from jaxdml.retrieval import rerank as rerank_lib
from jaxdml.retrieval import rerank_spec
from jaxdml.retrieval import scann_backend
from jaxdml.retrieval.index_files import FORMAT, IndexFileError, check_replaceable

__all__ = ["Index", "Match", "Saved", "read", "check_options", "check_replaceable",
           "IndexFileError", "FORMAT", "REBUILD_FRACTION"]

EMBEDDINGS = "embeddings.npy"
IDS = "ids.npy"
SCANN_DIR = "scann"
BACKENDS = ("auto", "exact", "scann")
# ScaNN's default re-scoring depth is set at build time for this many neighbours.
SCANN_BUILD_K = 100
# Neighbours per item the build-time recall audit checks.
AUDIT_K = 10
# A ScaNN index is rebuilt once its exactly searched additions pass this
# fraction of the rows its searcher holds.
REBUILD_FRACTION = 0.1
REBUILD = "rebuild it: Index.build(embeddings).save(path)"


class Match(NamedTuple):
  """`Index.match`'s answer per query."""
  matched: np.ndarray  # bool [Q]: the nearest item scores at least the threshold
  ids: np.ndarray  # int64 [Q]: the nearest item's id, matched or not
  scores: np.ndarray  # float32 [Q]: its score


class Index:
  """Embeddings searchable by nearest neighbour; see the module docstring.

  Made by `Index.build` or `Index.load`. Rows the ScaNN searcher holds come
  first; the rows added since are searched exactly (an exact index holds
  all of its rows that way).
  """

  def __init__(self, indexed: np.ndarray, added: np.ndarray, *, similarity: str,
               ids: np.ndarray | None, searcher, scann_config: dict | None,
               scann_overrides: dict | None):
    self._indexed = indexed  # float32 [M, D]: the rows `searcher` holds (M = 0: none)
    self._added = [added]  # float32 blocks: rows M.., searched exactly
    self._ids = ids  # int64 [N], or None: the row numbers
    self.similarity = similarity
    self._searcher = searcher
    self._scann_config = scann_config
    self._scann_overrides = dict(scann_overrides or {})
    self._dba = (None, None)  # ((k, alpha, count), DBA's augmented rows) of the last use

  @classmethod
  def build(cls, embeddings: ArrayLike, *, similarity: str = "cosine", backend: str = "auto",
            scann_config: dict | None = None, ids: ArrayLike | None = None) -> "Index":
    """An index of `embeddings` (numeric [N, D], kept as float32).

    Args:
      embeddings: the rows to search.
      similarity: "cosine", "dot" or "euclidean" (scores: module docstring).
      backend: "exact", "scann", or "auto" (ScaNN from
        `scann_backend.BRUTE_FORCE_BELOW` rows on).
      scann_config: ScaNN settings overriding `scann_backend.default_config`
        (`{"brute_force": False}` asks for a tree below that size); ignored
        by exact search, as `retrieval.search` does.
      ids: int [N], what searches return for each row; default the row
        numbers. Repeats are allowed (several embeddings of one item).
    """
    check_options(similarity, backend)
    embeddings = _embeddings("embeddings", embeddings)
    ids = _ids(ids, len(embeddings))
    if backend == "auto":
      backend = "scann" if len(embeddings) >= scann_backend.BRUTE_FORCE_BELOW else "exact"
    empty = np.zeros((0, embeddings.shape[1]), np.float32)
    if backend == "exact":
      return cls(empty, embeddings, similarity=similarity, ids=ids, searcher=None,
                 scann_config=None, scann_overrides=None)
    index = cls(empty, embeddings, similarity=similarity, ids=ids, searcher=None,
                scann_config=None, scann_overrides=scann_config)
    index._index_with_scann()
    return index

  @property
  def count(self) -> int:
    """The number of rows N."""
    return len(self._indexed) + sum(len(block) for block in self._added)

  def __len__(self) -> int:
    return self.count

  @property
  def dim(self) -> int:
    """The embedding width D."""
    return self._indexed.shape[1]

  @property
  def backend(self) -> str:
    """"scann" while a ScaNN searcher serves, else "exact"."""
    return "exact" if self._searcher is None else "scann"

  @property
  def scann_config(self) -> dict | None:
    """ScaNN's settings as built and audited (`"audit"`: the report); kept
    where the audit sent the index to exact search; None for an index
    built exact."""
    return None if self._scann_config is None else dict(self._scann_config)

  @property
  def embeddings(self) -> np.ndarray:
    """float32 [N, D], the rows in order (a new array)."""
    return np.concatenate([self._indexed, self._exact_rows()])

  @property
  def ids(self) -> np.ndarray:
    """int64 [N], what `search` returns for each row."""
    return np.arange(self.count, dtype=np.int64) if self._ids is None else self._ids.copy()

  def __repr__(self) -> str:
    return f"Index({self.count} x {self.dim}, {self.similarity}, {self.backend})"

  def search(self, queries: ArrayLike, k: int, *,
             rerank: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best rows for each query, best first.

    Args:
      queries: numeric [Q, D].
      k: 1 <= k <= count.
      rerank: None, or a re-ranking spec (`rerank_spec.check`, e.g.
        `{"name": "alpha_qe", "n": 2, "alpha": 3.0}`): the index is
        searched `depth` deep (default 100, at least k), the method
        reorders those candidates and the top k are returned, with the
        method's scores. DBA's augmented rows are computed once per
        (k, alpha) and size of the index; k-reciprocal searches the
        queries and rows together exactly, (Q + N)^2 work per call: for
        a large index prefer alpha-QE or DBA.

    Returns:
      `(scores float32 [Q, k], ids int64 [Q, k])`. Exact ties go to the
      lower row.
    """
    queries = self._queries(queries)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.count:
      raise ValueError(f"k={k!r}: ask for 1 to {self.count} neighbours (the index's size).")
    k = int(k)
    spec = rerank_spec.check(rerank, self.similarity)
    if spec is None:
      scores, rows = self._search_rows(queries, k)
    else:
      _, candidates = self._search_rows(queries, rerank_spec.depth(spec, k, self.count))
      if spec["name"] == "dba":
        scores, rows = rerank_lib.rescore(queries, self._augmented(spec), candidates)
      else:
        exact_search = lambda q, g, depth, exclude_self: exact.search(
            q, g, depth, exclude_self=exclude_self, similarity=self.similarity)
        scores, rows = rerank_spec.apply(spec, queries, self.embeddings, candidates,
                                       search=exact_search, same_set=False,
                                       similarity=self.similarity)
      scores, rows = scores[:, :k], rows[:, :k]
    return scores, (rows if self._ids is None else self._ids[rows])

  def _search_rows(self, queries, k: int):
    """`(scores, rows)` of the `k` best rows: the searcher's and the added rows' merged."""
    parts = []
    if self._searcher is not None:
      parts.append(self._search_scann(queries, min(k, len(self._indexed))))
    added = self._exact_rows()
    if len(added):
      scores, rows = exact.search(queries, added, min(k, len(added)), similarity=self.similarity)
      parts.append((scores, rows + len(self._indexed)))
    return _merge(parts, k)

  def _augmented(self, spec: dict) -> np.ndarray:
    """DBA's rows (`rerank.augment_database`), each row's neighbours found
    by this index's own search; kept until the index grows."""
    key = (spec["k"], spec["alpha"], self.count)
    if self._dba[0] != key:
      k = min(spec["k"], self.count - 1)
      _, own = self._search_rows(self.embeddings, min(k + 1, self.count))
      self._dba = (key, rerank_lib.augment_database(self.embeddings, own, k=k,
                                                    alpha=spec["alpha"]))
    return self._dba[1]

  def match(self, queries: ArrayLike, threshold: float) -> Match:
    """Whether each query is an item of the index: its nearest row scores at
    least `threshold`, on the similarity's scale (cosine: -1 to 1, an exact
    duplicate ~1 give or take float rounding, so ask a little less; dot:
    the inner product; euclidean: minus the squared distance, so within
    distance r is `threshold=-r**2`).

    `queries` numeric [Q, D]; `Match` holds bool, int64 and float32 [Q] arrays.
    """
    threshold = float(threshold)
    bounds = {"cosine": (-1.0, 1.0), "euclidean": (-np.inf, 0.0)}.get(self.similarity,
                                                                     (-np.inf, np.inf))
    if not (np.isfinite(threshold) and bounds[0] <= threshold <= bounds[1]):
      scale = {"cosine": "cosine scores lie in [-1, 1]",
               "euclidean": "scores are minus squared distances: within distance r is "
                            "threshold=-r**2"}.get(self.similarity, "pass a finite number")
      raise ValueError(f"threshold={threshold} can never be met by {self.similarity} "
                       f"scores: {scale}.")
    scores, ids = self.search(queries, 1)
    return Match(matched=scores[:, 0] >= threshold, ids=ids[:, 0], scores=scores[:, 0])

  def add(self, embeddings: ArrayLike, ids: ArrayLike | None = None) -> None:
    """Appends rows (numeric [n, D]); `ids` (int [n]) is required when the
    index was given ids, else the new rows are numbered on. A ScaNN index
    is rebuilt once the rows added since it was built pass
    `REBUILD_FRACTION` of those it holds."""
    embeddings = self._queries(embeddings, "embeddings")
    if ids is None and self._ids is not None:
      raise ValueError("This index was built with ids: pass ids= for the added rows too.")
    if ids is not None:
      ids = _ids(ids, len(embeddings))
      self._ids = np.concatenate([self.ids, ids])
    self._added.append(embeddings)
    if (self._searcher is not None
        and self.count - len(self._indexed) > REBUILD_FRACTION * len(self._indexed)):
      self._index_with_scann()

  def save(self, path: str, *, metadata: Mapping | None = None,
           attachments: Mapping[str, bytes] | None = None) -> dict:
    """Writes the index to the folder or URL `path`, replacing an index
    there (never another folder: `check_replaceable`).

    Args:
      metadata: more JSON entries for the manifest (the image index's model).
      attachments: more files, name -> bytes, checked on load like the
        index's own (the image index's list of files); `read` returns them.

    Returns:
      The manifest written.
    """
    manifest = {"count": self.count, "dim": self.dim, "similarity": self.similarity,
                "backend": self.backend, "scann_config": self.scann_config,
                "scann_overrides": self._scann_overrides, "scann_rows": len(self._indexed),
                "ids": self._ids is not None}
    own = (EMBEDDINGS, IDS, SCANN_DIR, index_files.MANIFEST)
    clash = sorted(set(metadata or {}) & {*manifest, "format", "files"})
    bad = [name for name in attachments or {} if name in own or os.path.basename(name) != name]
    if clash or bad:
      raise ValueError(f"metadata keys {clash} or attachment names {bad} would overwrite the "
                       "index's own: rename them.")

    def fill(folder):
      np.save(os.path.join(folder, EMBEDDINGS), self.embeddings)
      if self._ids is not None:
        np.save(os.path.join(folder, IDS), self._ids)
      if self._searcher is not None:
        os.makedirs(os.path.join(folder, SCANN_DIR))
        # Relative asset paths: the folder is renamed or uploaded after this.
        self._searcher.serialize(os.path.join(folder, SCANN_DIR), relative_path=True)
      for name, data in (attachments or {}).items():
        with open(os.path.join(folder, name), "wb") as f:
          f.write(data)
    return index_files.write_folder(path, fill, {**manifest, **(metadata or {})})

  @classmethod
  def load(cls, path: str) -> "Index":
    """The index `save` wrote at `path`, every file checked (`read`)."""
    return read(path).index

  def _queries(self, x, name="queries") -> np.ndarray:
    x = _embeddings(name, x)
    if x.shape[1] != self.dim:
      raise ValueError(f"{name} are {x.shape[1]}-d; this index holds {self.dim}-d "
                       "embeddings: embed them with the index's model.")
    return x

  def _exact_rows(self) -> np.ndarray:
    """The exactly searched rows as one array (blocks joined once)."""
    if len(self._added) > 1:
      self._added = [np.concatenate(self._added)]
    return self._added[0]

  def _index_with_scann(self) -> None:
    """(Re)builds and audits the ScaNN searcher over every row; where no
    setting meets the audit's target the index searches exactly."""
    rows = self.embeddings
    searcher, self._scann_config = _build_scann(rows, self.similarity, self._scann_overrides)
    self._searcher = searcher
    if searcher is None:
      self._indexed, self._added = rows[:0], [rows]
    else:
      self._indexed, self._added = rows, [rows[:0]]

  def _search_scann(self, queries, k):
    settings = self._scann_config
    tree = not settings["brute_force"]
    # Deeper than the audit's k: re-scoring scaled as `default_config` does.
    rows, scores = self._searcher.search_batched_parallel(
        exact.prepare(queries, self.similarity), final_num_neighbors=k,
        batch_size=settings["batch_size"],
        leaves_to_search=settings["num_leaves_to_search"] if tree else None,
        pre_reorder_num_neighbors=max(settings["reorder_k"], 4 * k) if tree else None)
    rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
    if rows.shape != (len(queries), k):
      raise RuntimeError(f"ScaNN returned {rows.shape[1]} neighbours per query, {k} asked: "
                         "rebuild the index with more leaves to search "
                         "(scann_config={'num_leaves_to_search': ...}).")
    # ScaNN returns squared distances for euclidean; scores rank larger-is-better.
    return (-scores if self.similarity == "euclidean" else scores), rows


def check_options(similarity: str, backend: str) -> None:
  """ValueError naming the choices unless `similarity` and `backend` are known."""
  if similarity not in exact.SIMILARITIES:
    raise ValueError(f"similarity={similarity!r}: expected one of {exact.SIMILARITIES}.")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}.")


def _embeddings(name: str, x) -> np.ndarray:
  # Imported here: the package's __init__ imports this module first.
  from jaxdml.retrieval import _check_embeddings  # pylint: disable=g-import-not-at-top
  return np.asarray(_check_embeddings(name, x), np.float32)


def _ids(ids, count: int) -> np.ndarray | None:
  if ids is None:
    return None
  ids = np.asarray(ids)
  if ids.shape != (count,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be an integer [{count}] array, one per row; got {ids.dtype} "
                     f"{ids.shape}.")
  return ids.astype(np.int64)


def _merge(parts, k):
  """The best `k` of several (scores, rows) lists; ties to the earlier part
  (it holds the lower rows)."""
  if len(parts) == 1:
    return parts[0]
  scores = np.concatenate([s for s, _ in parts], axis=1)
  rows = np.concatenate([r for _, r in parts], axis=1)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _build_scann(rows, similarity, overrides):
  """(searcher or None, settings): ScaNN over `rows`, audited."""
  k = min(SCANN_BUILD_K, len(rows))
  settings = scann_backend.resolve_config(len(rows), k, similarity, overrides)
  prepared = exact.prepare(rows, similarity)
  searcher = scann_backend.build_searcher(prepared, k, similarity=similarity, config=settings)
  if settings["brute_force"] or int(settings["audit_sample"]) <= 0 or len(rows) < 2:
    return searcher, settings
  return _audited(searcher, prepared, settings, similarity)


def _audited(searcher, prepared, settings, similarity):
  """The searcher and its settings deepened until a sample of the indexed
  rows, used as queries, finds its exact `AUDIT_K` nearest neighbours as the
  target asks (`scann_backend.audit`); (None, settings) where no setting
  meets it: the index then searches exactly."""
  k = min(AUDIT_K, len(prepared) - 1) + 1  # + the row itself
  chosen = scann_backend.audit(searcher, prepared, prepared, k, exclude_self=True,
                               similarity=similarity, config=settings)
  settings = {**settings, "audit": chosen["report"]}
  if chosen["leaves"] is None:
    logging.warning("ScaNN misses the recall target even searching every leaf (%s): this "
                    "index searches exactly.", chosen["report"])
    return None, settings
  settings.update(num_leaves_to_search=chosen["leaves"],
                  reorder_k=max(chosen["reorder_k"], settings["reorder_k"]))
  return searcher, settings



class Saved(NamedTuple):
  """What `read` found: the index, its manifest (metadata included) and
  the attachments' bytes by file name."""
  index: Index
  manifest: dict
  attachments: dict


def read(path: str, *, rebuild: str = REBUILD) -> Saved:
  """The index `Index.save` wrote at `path` (a folder or a URL), after
  checking its format, its manifest and every file the manifest lists
  (size and sha256): any mismatch is one `IndexFileError` naming the file
  and `rebuild`, the fix; no manifest at all is a FileNotFoundError."""
  required = ("count", "dim", "similarity", "backend", "scann_config", "scann_overrides",
              "scann_rows", "ids")
  with index_files.opened(path, rebuild=rebuild, required=required) as folder:
    manifest = folder.manifest
    if manifest["similarity"] not in exact.SIMILARITIES:
      raise folder.error(f"{index_files.MANIFEST} names similarity {manifest['similarity']!r}")
    count, dim = int(manifest["count"]), int(manifest["dim"])
    embeddings = folder.array(EMBEDDINGS, np.float32, (count, dim))
    ids = folder.array(IDS, np.int64, (count,)) if manifest["ids"] else None
    searcher = None
    if manifest["backend"] == "scann":
      scann = scann_backend._import_scann()  # pylint: disable=protected-access
      try:
        searcher = scann.load_searcher(folder.file(SCANN_DIR))
      except Exception as error:  # pylint: disable=broad-except  (ScaNN's own errors)
        raise folder.error(f"{SCANN_DIR}/ does not load ({type(error).__name__})") from None
    attachments = {name: folder.read_bytes(name) for name in manifest["files"]
                   if name not in (EMBEDDINGS, IDS) and not name.startswith(SCANN_DIR + "/")}
  rows = int(manifest["scann_rows"]) if searcher is not None else 0
  index = Index(embeddings[:rows], embeddings[rows:], similarity=manifest["similarity"],
                ids=ids, searcher=searcher, scann_config=manifest["scann_config"],
                scann_overrides=manifest["scann_overrides"])
  return Saved(index=index, manifest=manifest, attachments=attachments)
