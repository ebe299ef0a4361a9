"""Re-ranking as a search option: a spec, checked once, applied to a search's lists.

    retrieval.evaluate(q, ql, g, gl, rerank={"name": "alpha_qe", "n": 2, "alpha": 3.0})
    index.search(queries, 10, rerank={"name": "k_reciprocal"})
    config.evals.retrieval.rerank = {"name": "dba", "k": 2}

A spec names one of `METHODS` with any of its hyperparameters (the rest
take the papers' values) and `depth`, how many candidates the first search
fetches per query (default `DEPTH`; at least what the caller reads). The
first search runs on the caller's backend (exact or ScaNN), the
`jaxdml.retrieval.rerank` function reorders each query's list, and the
caller reads its top k of the reordered list: a re-ranking only reorders
candidates, so what the first search missed stays missed.

The searches a method needs besides (DBA: each gallery item's neighbours
in the gallery; k-reciprocal: the neighbours of every query and gallery
item in their union) run on the same backend through the caller's
`search(query, gallery, k, exclude_self)`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from jaxdml.retrieval import rerank

# name -> its hyperparameters and their defaults (the papers': alpha-QE and
# DBA n = k = 2, alpha = 3; k-reciprocal k1 = 20, k2 = 6, lambda = 0.3).
METHODS = {
    "alpha_qe": {"n": 2, "alpha": 3.0},
    "dba": {"k": 2, "alpha": 3.0},
    "k_reciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.3, "normalization": "farthest"},
}
# Candidates per query the first search fetches for re-ranking by default.
DEPTH = 100


def check(spec: Mapping[str, Any] | None, similarity: str = "cosine") -> dict | None:
  """`spec` with every hyperparameter filled in, or None for no re-ranking
  (None or an empty dict); anything else wrong is one ValueError naming it.

  `similarity` is the search's: k-reciprocal needs a distance ("cosine" or
  "euclidean"); alpha-QE and DBA re-score by cosine whatever it is.
  """
  if spec is None or (isinstance(spec, dict) and not spec):
    return None
  example = '{"name": "alpha_qe", "n": 2, "alpha": 3.0}'
  if not isinstance(spec, dict) or spec.get("name") not in METHODS:
    name = spec.get("name") if isinstance(spec, dict) else None
    raise ValueError(f"rerank={spec!r}: expected None or a dict naming one of "
                     f"{sorted(METHODS)} (name={name!r}), e.g. {example}.")
  name, settings = spec["name"], dict(METHODS[spec["name"]], depth=DEPTH)
  unknown = sorted(set(spec) - set(settings) - {"name"})
  if unknown:
    raise ValueError(f"rerank {name!r} takes no {unknown}; its settings: "
                     f"{sorted(settings)} (defaults {settings}).")
  settings.update({k: v for k, v in spec.items() if k != "name"})
  for key in ("n", "k", "k1", "k2"):
    if key in settings:
      rerank._count(f"rerank {name} {key}", settings[key], low=1)  # pylint: disable=protected-access
  rerank._count(f"rerank {name} depth", settings["depth"], low=1)  # pylint: disable=protected-access
  if "alpha" in settings:
    settings["alpha"] = rerank._alpha(settings["alpha"])  # pylint: disable=protected-access
  if name == "k_reciprocal":
    if not 0.0 <= float(settings["lambda_value"]) <= 1.0:
      raise ValueError(f"rerank k_reciprocal lambda_value must be in [0, 1] (the paper's "
                       f"0.3), got {settings['lambda_value']!r}.")
    if settings["normalization"] not in rerank.NORMALIZATIONS:
      raise ValueError(f"rerank k_reciprocal normalization={settings['normalization']!r}; "
                       f"choose from {rerank.NORMALIZATIONS}.")
    if similarity not in ("cosine", "euclidean"):
      raise ValueError(f"rerank k_reciprocal needs a distance: similarity {similarity!r} "
                       "is not one; use 'cosine' or 'euclidean'.")
  return {"name": name, **settings}


def depth(spec: dict, k: int, available: int) -> int:
  """How deep the first search goes: the spec's depth, at least `k`, at most `available`."""
  return min(int(available), max(int(k), int(spec["depth"])))


Search = Callable[..., tuple]  # (query, gallery, k, exclude_self) -> (scores, indices)


def apply(spec: dict, query: ArrayLike, gallery: ArrayLike, indices: ArrayLike, *, search: Search,
          same_set: bool, similarity: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
  """Each query's candidates `indices` [Q, d] reordered by `spec` (`check`ed).

  `same_set`: the gallery is the query set itself (leave-one-out; `gallery`
  is then the same array); `search` is the first search's, for the
  neighbour lists DBA and k-reciprocal need.

  Returns:
    `(scores float32 [Q, d], indices int64 [Q, d])`, best first; scores
    are the method's (cosine to the expanded query or augmented item;
    minus k-reciprocal's final distance).
  """
  name = spec["name"]
  if name == "alpha_qe":
    return rerank.alpha_qe(query, gallery, indices, n=spec["n"], alpha=spec["alpha"])
  if name == "dba":
    own = min(spec["k"] + 1, len(gallery) - 1)
    _, gallery_indices = search(gallery, gallery, own, True)
    return rerank.dba(query, gallery, indices, gallery_indices, k=min(spec["k"], own),
                      alpha=spec["alpha"])
  union = query if same_set else np.concatenate(
      [np.asarray(query, np.float32), np.asarray(gallery, np.float32)])
  reach = min(max(spec["k1"] + 1, spec["k2"]), len(union))
  _, neighbors = search(union, union, reach, False)
  return rerank.k_reciprocal(
      query, None if same_set else gallery, indices, neighbors, k1=spec["k1"], k2=spec["k2"],
      lambda_value=spec["lambda_value"], similarity=similarity,
      normalization=spec["normalization"])
