"""Evaluators: embed functions in, metrics out, each at its cadence."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdml import evaluators, retrieval, sharding
from jaxdml.evaluators import asymmetric, base
from jaxdml.evaluators import retrieval as retrieval_evaluator


def _sets(rng, n=24, classes=6, size=4):
  labels = np.repeat(np.arange(classes), n // classes).astype(np.int32)
  centres = rng.integers(0, 256, (classes, size, size, 3))
  noise = rng.integers(-40, 40, (n, size, size, 3))
  images = np.clip(centres[labels] + noise, 0, 255).astype(np.uint8)
  return {"images": images, "labels": labels, "categories": labels // 2}


def _embed(images):
  """A known embedding function: the mean colour per image row."""
  return jnp.mean(images.astype(jnp.float32), axis=2).reshape(images.shape[0], -1)


COMMON = dict(task="single", towers={"query": 4, "gallery": 4, "teacher": 4}, ks=(1, 2),
              batch_size=8, picture=False)


def _retrieval(query, gallery, **kwargs):
  return retrieval_evaluator.Retrieval(
      "retrieval", sets={"query": query, "gallery": gallery}, mesh=sharding.make_mesh(),
      **{**COMMON, **kwargs})


def _asymmetric(query, **kwargs):
  sets = {"query": query, "gallery": None}
  return asymmetric.Asymmetric("asym", sets=sets, teacher_sets=sets, mesh=sharding.make_mesh(),
                               **{**COMMON, **kwargs})


def test_same_set_and_asymmetric_equal_evaluate_on_the_same_embeddings():
  rng = np.random.default_rng(0)
  query = _sets(rng)
  fns = {"query": _embed, "gallery": _embed, "teacher": _embed}
  got = {**_retrieval(query, None).run(fns, step=1), **_asymmetric(query).run(fns, step=1)}
  want = retrieval.evaluate(np.asarray(_embed(query["images"])), query["labels"], ks=(1, 2),
                            metrics=("recall", "r_precision", "map@r"))
  for k, v in want.items():
    assert got[k] == pytest.approx(v) and got[f"asym/{k}"] == pytest.approx(v), k
  assert "nn_distance" in got


def test_query_gallery_reports_instance_and_category_hits():
  rng = np.random.default_rng(1)
  query, gallery = _sets(rng), _sets(rng)
  ev = _retrieval(query, gallery, protocol="query_gallery")
  got = ev.run({"query": _embed, "gallery": _embed}, step=1)
  q, g = np.asarray(_embed(query["images"])), np.asarray(_embed(gallery["images"]))
  want = retrieval.evaluate(q, query["labels"], g, gallery["labels"], ks=(1, 2))
  cat = retrieval.evaluate(q, query["categories"], g, gallery["categories"], ks=(1, 2))
  assert got["recall@1"] == pytest.approx(want["recall@1"])
  assert got["category/recall@1"] == pytest.approx(cat["recall@1"])


def test_each_evaluator_runs_at_its_own_cadence_and_all_at_the_end():
  rng = np.random.default_rng(2)
  query = _sets(rng)
  both = [_retrieval(query, None, every=5), _asymmetric(query, every=10)]
  due = lambda step, total: tuple(e.name for e in both if e.due(step, total))
  assert due(5, 100) == ("retrieval",)
  assert due(10, 100) == ("retrieval", "asym")
  assert due(7, 100) == ()
  only_at_the_end = [_retrieval(query, None, every=0)]
  assert [e.due(s, 100) for e in only_at_the_end for s in (50, 100)] == [False, True]
  only = both[0].run({"query": _embed, "teacher": _embed}, step=5)
  assert not any(k.startswith("asym/") for k in only)


def test_protocols_that_do_not_fit_the_data_are_named():
  rng = np.random.default_rng(3)
  query = _sets(rng)
  with pytest.raises(ValueError, match="expected 'auto' or one of"):
    _retrieval(query, None, protocol="leave_one_out")
  with pytest.raises(ValueError, match="'query_gallery' does not fit.*no separate gallery"):
    _retrieval(query, None, protocol="query_gallery")
  with pytest.raises(ValueError, match="needs a single-encoder recipe with a config.teacher"):
    _asymmetric(query, towers={"query": 4, "gallery": 4})


def test_any_metric_evaluate_knows_runs_during_training():
  """MAP, MRR and NMI are settings of the evaluator, scored as evaluate scores them."""
  rng = np.random.default_rng(4)
  query = _sets(rng)
  metrics = ("recall", "map", "mrr", "nmi")
  got = _retrieval(query, None, metrics=metrics).run({"query": _embed}, step=1)
  want = retrieval.evaluate(np.asarray(_embed(query["images"])), query["labels"], ks=(1, 2),
                            metrics=metrics)
  assert want and all(got[k] == pytest.approx(v) for k, v in want.items())


class _Centroid(base.Evaluator):
  """A new evaluator type from outside the package: the mean embedding's norm."""

  def run(self, embed_fns, step):
    return {"centroid_norm": float(jnp.linalg.norm(jnp.mean(embed_fns["query"](
        jnp.ones((2, 4, 4, 3), jnp.uint8) * step), axis=0)))}


def test_a_new_evaluator_type_is_one_class_and_its_registration(monkeypatch):
  monkeypatch.setattr(evaluators, "_TYPES", dict(evaluators._TYPES))
  evaluators.register("centroid", _Centroid, {"batch_size": 8})
  evals = ml_collections.ConfigDict({"c": dict(type="centroid", every=3),
                                     "off": dict(type="centroid", enabled=False)})
  evaluators.validate(evals)
  built = evaluators.build(evals, data=None, task="single", towers={"query": 4},
                           mesh=sharding.make_mesh())
  assert [(e.name, e.every) for e in built] == [("c", 3)]
  assert built[0].run({"query": _embed}, step=2) == {"centroid_norm": pytest.approx(4 * 3 ** 0.5)}
  with pytest.raises(ValueError, match=r"config.evals.c: a 'centroid' evaluator takes no "
                                       r"setting\(s\) \['ks'\]"):
    evaluators.validate({"c": dict(type="centroid", ks=(1,))})
  with pytest.raises(ValueError, match="evaluator type 'centroids'.*'centroid'"):
    evaluators.validate({"c": dict(type="centroids")})
