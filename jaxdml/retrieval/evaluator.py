"""Retrieval evaluation inside the train loop and for `--mode=eval`.

In big_vision's manner: `Evaluator(predict_fns, **cfg).run(state, step)`
embeds the evaluation sets with jitted functions built once, searches, and
returns metrics; it also draws `workdir/retrieval_STEP.png`. Protocols:
- `sbir`: sketches (query tower) -> test photos (gallery tower); the
  instance hit (`recall@K`: the sketch's own photo) and the category hit
  (`category/...`) come from one search.
- `single` same-set (CUB, Cars, SOP): leave-one-out over one set.
- `single` query -> gallery (In-Shop, DeepFashion2).
- asymmetric (`eval.asymmetric`, RAML): besides the symmetric metrics, the
  student's queries against a database the frozen teacher embeds at its own
  resolution, reported under `asym/`.
Every protocol also reports `nn_distance`: the mean distance from a query to
its nearest gallery item after L2 normalisation (how spread out the
embeddings are; KoLeo should raise it).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxdml import data as data_lib
from jaxdml import tasks
from jaxdml import sharding as sharding_lib
from jaxdml import teacher as teacher_lib
from jaxdml.retrieval import count_relevant, metrics_from_neighbors, search
from jaxdml.retrieval.picture import save_retrieval_grid


def make_embed_fn(model, mesh, method=None):
  """Jitted `(variables, uint8 images) -> embeddings`, batch on `data`."""
  def embed(variables, images):
    out, _ = model.apply(variables, data_lib.normalize(images), train=False,
                         method=method)
    return out
  return jax.jit(embed, in_shardings=(sharding_lib.replicated(mesh),
                                      sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.replicated(mesh))


def embed_all(embed_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
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
    out = embed_fn(variables, sharding_lib.global_batch({"x": share}, mesh)["x"])
    outputs.append(sharding_lib.to_host(out)[:batch_size - pad])
  return np.concatenate(outputs).astype(np.float32)


def _process_share(batch: np.ndarray) -> np.ndarray:
  n, p = jax.process_count(), jax.process_index()
  per = len(batch) // n
  return batch[p * per:(p + 1) * per]


class Evaluator:
  """Embeds the evaluation sets, searches, and scores every label set."""

  def __init__(self, predict_fns: dict, *, query: dict, gallery: dict | None, mesh,
               ks=(1, 5, 10), backend="exact", similarity="cosine",
               scann_config=None, batch_size=256, workdir=None, picture=True,
               picture_k=6, picture_queries=8, teacher_gallery: dict | None = None):
    """`predict_fns`: `query`, `gallery` and, for `teacher_gallery` (the
    gallery images at the teacher's resolution), `teacher`."""
    self.predict_fns = predict_fns
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
  def from_config(cls, config, model, mesh, workdir, teacher_model=None):
    cfg = config.eval
    sets = data_lib.eval_sets(config.data, task=config.task)
    if config.task == "sbir":
      fns = {"query": make_embed_fn(model, mesh, "embed_query"),
             "gallery": make_embed_fn(model, mesh, "embed_gallery")}
    else:
      fn = make_embed_fn(model, mesh)
      fns = {"query": fn, "gallery": fn}
    teacher_gallery = None
    if cfg.get("asymmetric", False):
      if teacher_model is None or config.task != "single":
        raise ValueError("config.eval.asymmetric needs a single-encoder recipe with a "
                         "config.teacher (the database is the teacher's).")
      fns["teacher"] = make_embed_fn(teacher_model, mesh)
      hi = data_lib.eval_sets(config.data, task="single",
                              image_size=teacher_lib.image_size(config))
      teacher_gallery = hi["gallery"] or hi["query"]
    scann_config = cfg.get("scann_config", None)
    return cls(fns, query=sets["query"], gallery=sets["gallery"], mesh=mesh,
               teacher_gallery=teacher_gallery,
               ks=cfg.get("ks", (1, 5, 10)), backend=cfg.get("backend", "exact"),
               similarity=cfg.get("similarity", "cosine"),
               scann_config=scann_config.to_dict() if scann_config else None,
               batch_size=cfg.get("batch_size", 256), workdir=workdir,
               picture=cfg.get("picture", True))

  def run(self, state, step: int) -> dict:
    variables = tasks.model_variables(state)
    q = embed_all(self.predict_fns["query"], variables, self.query["images"],
                  self.batch_size, self.mesh)
    same_set = self.gallery is None
    gallery = self.query if same_set else self.gallery
    g = q if same_set else embed_all(self.predict_fns["gallery"], variables,
                                     gallery["images"], self.batch_size, self.mesh)
    results, indices = self._score(q, g, gallery, same_set)
    if self.teacher_gallery is not None:
      g_teacher = embed_all(self.predict_fns["teacher"], state["teacher"],
                            self.teacher_gallery["images"], self.batch_size, self.mesh)
      asym, _ = self._score(q, g_teacher, gallery, same_set)
      results.update({f"asym/{k}": v for k, v in asym.items()})
    if self.picture and self.workdir and jax.process_index() == 0:
      # Evenly spaced queries: the first few often share one category.
      rows = np.unique(np.linspace(0, len(q) - 1, self.picture_queries).astype(int))
      top = indices[rows, :self.picture_k]
      hits = gallery["labels"][top] == self.query["labels"][rows, None]
      save_retrieval_grid(os.path.join(self.workdir, f"retrieval_{step}.png"),
                          self.query["images"][rows], gallery["images"], top, hits,
                          max_queries=len(rows))
    return results

  def _score(self, q, g, gallery: dict, same_set: bool) -> tuple[dict, np.ndarray]:
    """Metrics of queries `q` against gallery embeddings `g`, and the neighbours."""
    label_sets = {"": "labels"}
    if "categories" in self.query and not same_set:
      label_sets["category/"] = "categories"
    relevant = {p: count_relevant(self.query[key], gallery[key], same_set=same_set)
                for p, key in label_sets.items()}
    available = len(g) - int(same_set)
    k = min(available, max(max(self.ks), *(int(r.max()) for r in relevant.values())))
    _, indices = search(q, g, k, exclude_self=same_set, backend=self.backend,
                        similarity=self.similarity, scann_config=self.scann_config,
                        mesh=self.mesh)
    results = {}
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
