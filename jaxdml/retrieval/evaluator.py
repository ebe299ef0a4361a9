"""Retrieval evaluation inside the train loop and for `--mode=eval`.

In big_vision's manner: `Evaluator.from_config(...)` loads the evaluation
sets once; `run(embed_fns, step)` embeds them with the functions it is
given (tower -> `images -> embeddings`, from `jaxdml.build`; it never sees
the train state), searches, and returns metrics; it also draws
`workdir/retrieval_STEP.png`.

Protocols (`config.eval.protocols`; `PROTOCOLS` below, `register` adds
one), each run at its own cadence (`config.eval.every`, protocol -> steps,
default `config.eval_every`):
- `sbir`: sketches (query tower) -> test photos (gallery tower); the
  instance hit (`recall@K`: the sketch's own photo) and the category hit
  (`category/...`) come from one search.
- `same_set` (CUB, Cars, SOP): leave-one-out over one set.
- `query_gallery` (In-Shop, DeepFashion2): query tower on the queries,
  gallery tower on the gallery (plus `category/...` where sets have them).
- `asymmetric` (RAML): the student's queries against a database the
  teacher embeds at its own resolution, reported under `asym/`.
Every protocol also reports `nn_distance`: the mean distance from a query to
its nearest gallery item after L2 normalisation (how spread out the
embeddings are; KoLeo should raise it).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxdml import data as data_lib
from jaxdml import paths
from jaxdml import sharding as sharding_lib
from jaxdml.retrieval import count_relevant, metrics_from_neighbors, search_and_audit
from jaxdml.retrieval.picture import save_retrieval_grid


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Which tower embeds the queries and which the gallery, and where.

  `gallery_tower` "teacher" embeds the gallery images at the teacher's
  resolution; `same_set` says the query set is its own gallery.
  """
  query_tower: str
  gallery_tower: str
  same_set: bool
  prefix: str = ""


PROTOCOLS = {
    "sbir": Protocol("query", "gallery", same_set=False),
    "same_set": Protocol("query", "query", same_set=True),
    "query_gallery": Protocol("query", "gallery", same_set=False),
    "asymmetric": Protocol("query", "teacher", same_set=False, prefix="asym/"),
}


# Every `config.eval` field and its default (`config_lib.resolve` fills them in).
DEFAULTS = {
    "enabled": True, "protocols": None, "every": {}, "asymmetric": False,
    "ks": (1, 5, 10), "backend": "exact", "similarity": "cosine", "scann_config": None,
    "batch_size": 256, "picture": True,
}


def register(name: str, protocol: Protocol) -> None:
  if name in PROTOCOLS:
    raise ValueError(f"evaluation protocol {name!r} is already registered.")
  PROTOCOLS[name] = protocol


def default_protocols(config, has_gallery: bool) -> tuple:
  """The data's own protocol, plus `asymmetric` when `eval.asymmetric`."""
  own = "sbir" if config.task == "sbir" else "query_gallery" if has_gallery else "same_set"
  return (own,) + (("asymmetric",) if config.eval.get("asymmetric") else ())


def embed_all(embed_fn, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Embeds every image; the last batch is padded to keep one compiled shape."""
  n_data = mesh.shape[sharding_lib.DATA_AXIS]
  batch_size = max(n_data, batch_size // n_data * n_data)
  outputs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    share = _process_share(chunk)
    out = embed_fn(sharding_lib.global_batch({"x": share}, mesh)["x"])
    outputs.append(sharding_lib.to_host(out)[:batch_size - pad])
  return np.concatenate(outputs).astype(np.float32)


def _process_share(batch: np.ndarray) -> np.ndarray:
  n, p = jax.process_count(), jax.process_index()
  per = len(batch) // n
  return batch[p * per:(p + 1) * per]


class Evaluator:
  """Embeds the evaluation sets, searches, and scores every label set."""

  def __init__(self, *, query: dict, gallery: dict | None, mesh, protocols=("same_set",),
               every=None, ks=(1, 5, 10), backend="exact", similarity="cosine",
               scann_config=None, batch_size=256, workdir=None, picture=True,
               picture_k=6, picture_queries=8, teacher_gallery: dict | None = None):
    """`teacher_gallery`: the gallery images at the teacher's resolution
    (the `asymmetric` protocol); `every`: protocol -> steps between runs."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
      raise ValueError(f"config.eval.protocols={tuple(protocols)}: expected names from "
                       f"{sorted(PROTOCOLS)}.")
    for name in protocols:
      if PROTOCOLS[name].same_set != (gallery is None) and name != "asymmetric":
        raise ValueError(f"evaluation protocol {name!r} does not fit this data set, which "
                         f"{'has no' if gallery is None else 'has a'} separate gallery.")
    self.protocols, self.every = tuple(protocols), dict(every or {})
    self.query, self.gallery = query, gallery
    self.teacher_gallery = teacher_gallery
    self.mesh = mesh
    self.ks = tuple(int(k) for k in ks)
    self.backend, self.similarity = backend, similarity
    self.scann_config = scann_config
    self.batch_size = int(batch_size)
    self.workdir = workdir
    self.picture, self.picture_k, self.picture_queries = picture, picture_k, picture_queries

  @classmethod
  def from_config(cls, config, mesh, workdir, *, has_teacher=False, teacher_image_size=None):
    cfg = {**DEFAULTS, **config.eval.to_dict()}
    sets = data_lib.eval_sets(config.data, task=config.task)
    protocols = tuple(cfg["protocols"] or default_protocols(config, sets["gallery"] is not None))
    teacher_gallery = None
    if "asymmetric" in protocols:
      if not has_teacher or config.task != "single":
        raise ValueError("the asymmetric evaluation protocol needs a single-encoder recipe "
                         "with a config.teacher (the database is the teacher's).")
      hi = data_lib.eval_sets(config.data, task="single", image_size=teacher_image_size)
      teacher_gallery = hi["gallery"] or hi["query"]
    return cls(query=sets["query"], gallery=sets["gallery"], mesh=mesh,
               protocols=protocols, every=cfg["every"], teacher_gallery=teacher_gallery,
               ks=cfg["ks"], backend=cfg["backend"], similarity=cfg["similarity"],
               scann_config=cfg["scann_config"], batch_size=cfg["batch_size"],
               workdir=workdir, picture=cfg["picture"])

  def due(self, step: int, total: int, default_every: int) -> tuple:
    """The protocols to run at `step`: each at its cadence, all at the end."""
    if step == total:
      return self.protocols
    return tuple(p for p in self.protocols
                 if int(self.every.get(p, default_every) or 0)
                 and step % int(self.every.get(p, default_every)) == 0)

  def run(self, embed_fns: dict, step: int, protocols=None) -> dict:
    """Metrics of `protocols` (default all); `embed_fns`: tower -> images -> embeddings."""
    cache, results = {}, {}

    def embed(tower, image_set):
      key = (tower, id(image_set))
      if key not in cache:
        cache[key] = embed_all(embed_fns[tower], image_set["images"], self.batch_size,
                               self.mesh)
      return cache[key]

    for i, name in enumerate(protocols or self.protocols):
      protocol = PROTOCOLS[name]
      same_set = self.gallery is None
      gallery = self.query if same_set else self.gallery
      q = embed(protocol.query_tower, self.query)
      if protocol.gallery_tower == "teacher":
        g = embed("teacher", self.teacher_gallery)
      else:
        g = embed(protocol.gallery_tower, gallery)
      scores, indices = self._score(q, g, gallery, same_set)
      results.update({protocol.prefix + k: v for k, v in scores.items()})
      if i == 0 and self.picture and self.workdir and jax.process_index() == 0:
        self._draw(step, q, gallery, indices)
    return results

  def _draw(self, step, q, gallery, indices):
    # Evenly spaced queries: the first few often share one category.
    rows = np.unique(np.linspace(0, len(q) - 1, self.picture_queries).astype(int))
    top = indices[rows, :self.picture_k]
    hits = gallery["labels"][top] == self.query["labels"][rows, None]
    save_retrieval_grid(paths.join(self.workdir, f"retrieval_{step}.png"),
                        self.query["images"][rows], gallery["images"], top, hits,
                        max_queries=len(rows))

  def _score(self, q, g, gallery: dict, same_set: bool) -> tuple[dict, np.ndarray]:
    """Metrics of queries `q` against gallery embeddings `g`, and the neighbours."""
    label_sets = {"": "labels"}
    if "categories" in self.query and not same_set:
      label_sets["category/"] = "categories"
    relevant = {p: count_relevant(self.query[key], gallery[key], same_set=same_set)
                for p, key in label_sets.items()}
    available = len(g) - int(same_set)
    k = min(available, max(max(self.ks), *(int(r.max()) for r in relevant.values())))
    _, indices, results = search_and_audit(
        q, g, k, exclude_self=same_set, backend=self.backend, similarity=self.similarity,
        scann_config=self.scann_config, mesh=self.mesh,
        labels=(self.query["labels"], gallery["labels"]))
    for prefix, key in label_sets.items():
      ks = tuple(x for x in self.ks if x <= k)
      scores = metrics_from_neighbors(gallery[key][indices], self.query[key],
                                      relevant[prefix], ks=ks)
      results.update({prefix + name: value for name, value in scores.items()})
    results["nn_distance"] = mean_nn_distance(q, g[indices[:, 0]])
    return results, indices


def mean_nn_distance(queries: np.ndarray, nearest: np.ndarray) -> float:
  """Mean Euclidean distance between L2-normalised rows and their neighbours."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return float(np.mean(np.linalg.norm(unit(queries) - unit(nearest), axis=1)))
