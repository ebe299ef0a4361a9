"""The `retrieval` evaluator: a data set's own retrieval protocol.

Protocols (`protocol`; "auto" picks the data set's own):
- `sbir`: sketches (query tower) -> test photos (gallery tower); the
  instance hit (`recall@K`: the sketch's own photo) and the category hit
  (`category/...`) come from one search.
- `same_set` (CUB, Cars, SOP): leave-one-out over one set.
- `query_gallery` (In-Shop, DeepFashion2): query tower on the queries,
  gallery tower on the gallery (plus `category/...` where sets have them).
Scores come from `jaxdml.retrieval.evaluate` (any metric it knows, plus
`nn_distance`), under `prefix`, of the search's lists re-ranked first where
`rerank` names a method (`jaxdml.retrieval.rerank_spec`); `picture` draws `workdir/NAME_STEP.png`:
evenly spaced queries and their top results.
"""

from __future__ import annotations

import numpy as np

from jaxdml import config as config_lib
from jaxdml.config import defaults
from jaxdml.evaluators.base import Evaluator

PROTOCOLS = {  # protocol -> (query tower, gallery tower, the query set is its own gallery)
    "sbir": ("query", "gallery", False),
    "same_set": ("query", "query", True),
    "query_gallery": ("query", "gallery", False),
}


class Retrieval(Evaluator):
  """Queries against a gallery, scored by `jaxdml.retrieval.evaluate`."""

  SETTINGS = defaults.EVALUATOR_TYPES["retrieval"]
  gallery_tower = None  # None: the protocol's; a subclass may name another

  def __init__(self, name, *, data=None, task, towers, mesh, workdir=None, every=0,
               sets=None, picture_k=6, picture_queries=8, **settings):
    """`settings`: this type's (`SETTINGS`, defaults filled in); `sets`: the
    query and gallery sets themselves (`jaxdml.data.eval_sets`' layout),
    instead of loading the run's data."""
    config_lib.check_fields(f"config.evals.{name}", settings, self.SETTINGS)
    s = {**self.SETTINGS, **settings}
    super().__init__(name, data=data, task=task, towers=towers, mesh=mesh, workdir=workdir,
                     every=every, batch_size=s["batch_size"])
    self.split, self.metrics = s["split"], tuple(s["metrics"])
    self.ks = tuple(int(k) for k in s["ks"])
    self.backend, self.similarity = s["backend"], s["similarity"]
    self.scann_config = s["scann_config"]
    from jaxdml.retrieval import rerank_spec  # pylint: disable=g-import-not-at-top
    try:
      self.rerank = rerank_spec.check(s["rerank"], self.similarity)
    except ValueError as e:
      raise ValueError(f"config.evals.{name}.rerank: {e}") from None
    self.picture, self.prefix = bool(s["picture"]), s["prefix"]
    self.picture_k, self.picture_queries = picture_k, picture_queries
    sets = sets or self.load(self.towers["query"])
    self.query, self.gallery = sets["query"], sets["gallery"]
    self.protocol = self._protocol(s["protocol"])
    query_tower, gallery_tower, self.same_set = PROTOCOLS[self.protocol]
    self.query_tower = query_tower
    self.gallery_tower = self.gallery_tower or gallery_tower

  def load(self, image_size: int) -> dict:
    from jaxdml import data as data_lib  # pylint: disable=g-import-not-at-top
    return data_lib.eval_sets(self.data, task=self.task, image_size=image_size,
                              split=self.split)

  def _protocol(self, protocol: str) -> str:
    own = ("sbir" if self.task == "sbir" else
           "same_set" if self.gallery is None else "query_gallery")
    if protocol == "auto":
      return own
    if protocol not in PROTOCOLS:
      raise ValueError(f"config.evals.{self.name}.protocol={protocol!r}: expected 'auto' or "
                       f"one of {sorted(PROTOCOLS)}.")
    if PROTOCOLS[protocol][2] != (self.gallery is None):
      raise ValueError(f"evaluation protocol {protocol!r} does not fit this data set, which "
                       f"{'has no' if self.gallery is None else 'has a'} separate gallery.")
    return protocol

  def gallery_set(self) -> dict:
    return self.query if self.same_set else self.gallery

  def run(self, embed_fns: dict, step: int) -> dict:
    """Metrics of the queries against the gallery, under `prefix`."""
    from jaxdml import retrieval  # pylint: disable=g-import-not-at-top
    q = self.embed(embed_fns[self.query_tower], self.query["images"])
    gallery = self.gallery_set()
    if self.same_set and self.gallery_tower == self.query_tower:
      g = q
    else:
      g = self.embed(embed_fns[self.gallery_tower], gallery["images"])
    available = len(g) - int(self.same_set)
    label_sets = {}
    if "categories" in self.query and not self.same_set:
      label_sets["category/"] = (self.query["categories"], gallery["categories"])
    scores = retrieval.evaluate(
        q, self.query["labels"], g, gallery["labels"], exclude_self=self.same_set,
        ks=tuple(k for k in self.ks if k <= available) or (1,),
        metrics=self.metrics + ("nn_distance",), backend=self.backend,
        similarity=self.similarity, scann_config=self.scann_config, mesh=self.mesh,
        label_sets=label_sets, rerank=self.rerank)
    if self.picture and self.workdir:
      self._draw(step, q, g, gallery)
    return {self.prefix + k: v for k, v in scores.items()}

  def _draw(self, step, q, g, gallery) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    from jaxdml import paths  # pylint: disable=g-import-not-at-top
    from jaxdml.retrieval import exact  # pylint: disable=g-import-not-at-top
    from jaxdml.retrieval.picture import save_retrieval_grid  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return
    # Evenly spaced queries: the first few often share one category.
    rows = np.unique(np.linspace(0, len(q) - 1, self.picture_queries).astype(int))
    # A few queries: scored on the host, so only this process takes part.
    scores = exact.scores_numpy(q[rows], g, self.similarity)
    if self.same_set:  # each query's own row is not a result
      scores[np.arange(len(rows)), rows] = -np.inf
    k = min(self.picture_k, len(g) - int(self.same_set))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = gallery["labels"][top] == self.query["labels"][rows, None]
    path = paths.join(self.workdir, f"{self.name}_{step}.png")
    try:
      save_retrieval_grid(path, self.query["images"][rows], gallery["images"], top, hits,
                          max_queries=len(rows))
    except OSError as error:  # a read-only workdir: the metrics matter, not the picture
      print(f"Warning: could not write the retrieval picture {path} ({error}).")
