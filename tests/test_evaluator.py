"""Evaluation protocols: embed functions in, metrics out, each at its cadence."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import retrieval, sharding
from jaxdml.retrieval import evaluator as evaluator_lib


def _sets(rng, n=24, classes=6, size=4):
  labels = np.repeat(np.arange(classes), n // classes).astype(np.int32)
  centres = rng.integers(0, 256, (classes, size, size, 3))
  noise = rng.integers(-40, 40, (n, size, size, 3))
  images = np.clip(centres[labels] + noise, 0, 255).astype(np.uint8)
  return {"images": images, "labels": labels, "categories": labels // 2}


def _embed(images):
  """A known embedding function: the mean colour per image row."""
  return jnp.mean(images.astype(jnp.float32), axis=2).reshape(images.shape[0], -1)


def _evaluator(query, gallery, **kwargs):
  return evaluator_lib.Evaluator(query=query, gallery=gallery, mesh=sharding.make_mesh(),
                                 ks=(1, 2), batch_size=8, picture=False, **kwargs)


def test_same_set_and_asymmetric_equal_evaluate_on_the_same_embeddings():
  rng = np.random.default_rng(0)
  query = _sets(rng)
  ev = _evaluator(query, None, protocols=("same_set", "asymmetric"), teacher_gallery=query)
  got = ev.run({"query": _embed, "gallery": _embed, "teacher": _embed}, step=1)
  want = retrieval.evaluate(np.asarray(_embed(query["images"])), query["labels"], ks=(1, 2),
                            metrics=("recall", "r_precision", "map@r"))
  for k, v in want.items():
    assert got[k] == pytest.approx(v) and got[f"asym/{k}"] == pytest.approx(v), k
  assert "nn_distance" in got


def test_query_gallery_reports_instance_and_category_hits():
  rng = np.random.default_rng(1)
  query, gallery = _sets(rng), _sets(rng)
  ev = _evaluator(query, gallery, protocols=("query_gallery",))
  got = ev.run({"query": _embed, "gallery": _embed}, step=1)
  q, g = np.asarray(_embed(query["images"])), np.asarray(_embed(gallery["images"]))
  want = retrieval.evaluate(q, query["labels"], g, gallery["labels"], ks=(1, 2))
  cat = retrieval.evaluate(q, query["categories"], g, gallery["categories"], ks=(1, 2))
  assert got["recall@1"] == pytest.approx(want["recall@1"])
  assert got["category/recall@1"] == pytest.approx(cat["recall@1"])


def test_each_protocol_runs_at_its_own_cadence_and_all_at_the_end():
  rng = np.random.default_rng(2)
  query = _sets(rng)
  ev = _evaluator(query, None, protocols=("same_set", "asymmetric"),
                  every={"asymmetric": 10}, teacher_gallery=query)
  assert ev.due(5, 100, default_every=5) == ("same_set",)
  assert ev.due(10, 100, default_every=5) == ("same_set", "asymmetric")
  assert ev.due(7, 100, default_every=5) == ()
  assert ev.due(100, 100, default_every=0) == ("same_set", "asymmetric")
  only = ev.run({"query": _embed, "teacher": _embed}, step=5, protocols=("same_set",))
  assert not any(k.startswith("asym/") for k in only)


def test_protocols_that_do_not_fit_the_data_are_named():
  rng = np.random.default_rng(3)
  query = _sets(rng)
  with pytest.raises(ValueError, match="expected names from"):
    _evaluator(query, None, protocols=("leave_one_out",))
  with pytest.raises(ValueError, match="'query_gallery' does not fit.*no separate gallery"):
    _evaluator(query, None, protocols=("query_gallery",))
