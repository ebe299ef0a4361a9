"""Re-ranking as a search option: `evaluate(rerank=)`, `Index.search(rerank=)`,
`config.evals.NAME.rerank`: each equals the `rerank` functions called by hand
on the same search's lists."""
import numpy as np
import pytest

from jaxdml import retrieval, sharding
from jaxdml.evaluators import retrieval as retrieval_evaluator
from jaxdml.retrieval import rerank, rerank_spec

KS = (1, 2, 4)
DEPTH = 30
SPECS = {"alpha_qe": {"name": "alpha_qe", "n": 3, "alpha": 2.0, "depth": DEPTH},
         "dba": {"name": "dba", "k": 2, "alpha": 3.0, "depth": DEPTH},
         "k_reciprocal": {"name": "k_reciprocal", "k1": 6, "k2": 3, "lambda_value": 0.3,
                          "depth": DEPTH}}


def clustered(seed, n=160, classes=16, dim=12, noise=0.9):
  """Noisy clusters: neighbours share labels often, not always, so re-ranking moves them."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  centres = rng.normal(size=(classes, dim))
  return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


def by_hand(name, q, g, backend="exact"):
  """The first search `DEPTH` deep, re-ranked by the `rerank` function itself."""
  same_set = g is None
  gallery = q if same_set else g
  search = lambda a, b, k, exclude_self: retrieval.search(a, b, k, exclude_self=exclude_self,
                                                          backend=backend)
  _, idx = search(q, gallery, DEPTH, same_set)
  spec = SPECS[name]
  if name == "alpha_qe":
    return idx, rerank.alpha_qe(q, gallery, idx, n=spec["n"], alpha=spec["alpha"])[1]
  if name == "dba":
    _, own = search(gallery, gallery, spec["k"] + 1, True)
    return idx, rerank.dba(q, gallery, idx, own, k=spec["k"], alpha=spec["alpha"])[1]
  union = rerank.union_neighbors(q, g, spec["k1"] + 1, backend=backend)
  return idx, rerank.k_reciprocal(q, g, idx, union, k1=spec["k1"], k2=spec["k2"],
                                  lambda_value=spec["lambda_value"])[1]


def scored(indices, ql, gl, same_set):
  rel = retrieval.count_relevant(ql, gl, same_set=same_set)
  return retrieval.metrics_from_neighbors(gl[indices], ql, rel, ks=KS,
                                          metrics=("recall", "map@r"))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("same_set", [True, False], ids=["same_set", "query_gallery"])
def test_evaluate_reads_the_reranked_lists(name, same_set):
  x, labels = clustered(0)
  q, ql = x[:40], labels[:40]
  g, gl = (None, None) if same_set else (x[40:], labels[40:])
  plain, reranked = by_hand(name, q, g)
  assert (plain[:, :4] != reranked[:, :4]).any()  # the method moves candidates here
  want = scored(reranked, ql, ql if same_set else gl, same_set)
  got = retrieval.evaluate(q, ql, g, gl, ks=KS, metrics=("recall", "map@r"),
                           rerank=SPECS[name])
  assert got == pytest.approx(want)
  without = retrieval.evaluate(q, ql, g, gl, ks=KS, metrics=("recall", "map@r"))
  assert without == pytest.approx(scored(plain, ql, ql if same_set else gl, same_set))


def test_the_same_items_embedded_another_way_are_two_sets():
  """exclude_self with another gallery (a teacher's embeddings of the query
  images): k-reciprocal's graph holds queries and gallery items apart."""
  x, labels = clustered(7, n=80)
  teacher = x + 0.3 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
  spec = SPECS["k_reciprocal"]
  _, idx = retrieval.search(x, teacher, DEPTH, exclude_self=True)
  union = rerank.union_neighbors(x, teacher, spec["k1"] + 1)
  _, want = rerank.k_reciprocal(x, teacher, idx, union, k1=spec["k1"], k2=spec["k2"])
  got = retrieval.evaluate(x, labels, teacher, labels, exclude_self=True, ks=KS,
                           metrics=("recall", "map@r"), rerank=spec)
  assert got == pytest.approx(scored(want, labels, labels, True))


def test_evaluate_reranks_scann_lists_too():
  pytest.importorskip("scann")
  x, labels = clustered(1, n=400, classes=40)
  q, ql, g, gl = x[:50], labels[:50], x[50:], labels[50:]
  _, reranked = by_hand("alpha_qe", q, g, backend="scann")
  got = retrieval.evaluate(q, ql, g, gl, ks=KS, metrics=("recall", "map@r"),
                           backend="scann", rerank=SPECS["alpha_qe"])
  assert {k: v for k, v in got.items() if not k.startswith("scann/")} == pytest.approx(
      scored(reranked, ql, gl, False))


def test_the_first_search_goes_at_least_as_deep_as_the_metrics_read():
  """depth below what map@r reads (the largest class) is raised to it."""
  x, labels = clustered(2)
  shallow = {**SPECS["alpha_qe"], "depth": 1}
  got = retrieval.evaluate(x, labels, ks=KS, metrics=("recall", "map@r"), rerank=shallow)
  rel = retrieval.count_relevant(labels, labels, same_set=True)
  _, idx = retrieval.search(x, x, int(rel.max()), exclude_self=True)
  _, reranked = rerank.alpha_qe(x, x, idx, n=3, alpha=2.0)
  assert got == pytest.approx(scored(reranked, labels, labels, True))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_index_search_reranks_like_the_functions(name):
  x, _ = clustered(3)
  q, g = x[:20], x[20:]
  ids = np.arange(len(g)) * 7 + 1000
  index = retrieval.Index.build(g, ids=ids, backend="exact")
  _, reranked = by_hand(name, q, g)
  scores, found = index.search(q, 5, rerank=SPECS[name])
  np.testing.assert_array_equal(found, ids[reranked[:, :5]])
  assert scores.shape == (20, 5) and (np.diff(scores, axis=1) <= 1e-6).all()
  # Grown: DBA's augmented rows are recomputed over every row.
  index.add(q[:10], ids=np.arange(10) + 5000)
  grown = np.concatenate([g, q[:10]])
  _, want = by_hand(name, q[10:], grown)
  _, found = index.search(q[10:], 5, rerank=SPECS[name])
  np.testing.assert_array_equal(found, np.concatenate([ids, np.arange(10) + 5000])[want[:, :5]])


def test_index_reranks_its_scann_lists():
  """A ScaNN index: the re-ranking reorders the searcher's own deeper list."""
  pytest.importorskip("scann")
  x, _ = clustered(6, n=1500, classes=60)
  q, g = x[:30], x[30:]
  index = retrieval.Index.build(g, backend="scann")
  assert index.backend == "scann"
  _, candidates = index.search(q, DEPTH)
  want = rerank.alpha_qe(q, g, candidates, n=3, alpha=2.0)[1][:, :5]
  np.testing.assert_array_equal(index.search(q, 5, rerank=SPECS["alpha_qe"])[1], want)


@pytest.mark.parametrize("spec,match", [
    ({"name": "qe"}, r"one of \['alpha_qe', 'dba', 'k_reciprocal'\]"),
    ("alpha_qe", "expected None or a dict"),
    ({"name": "dba", "n": 2}, r"takes no \['n'\]; its settings: \['alpha', 'depth', 'k'\]"),
    ({"name": "alpha_qe", "alpha": -1}, "alpha must be a finite number >= 0"),
    ({"name": "alpha_qe", "depth": 0}, "depth must be an integer >= 1"),
    ({"name": "k_reciprocal", "lambda_value": 2}, r"lambda_value must be in \[0, 1\]"),
    ({"name": "k_reciprocal", "normalization": "max"}, "normalization='max'"),
])
def test_bad_specs_are_one_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    rerank_spec.check(spec)


def test_k_reciprocal_needs_a_distance_and_no_spec_is_no_reranking():
  with pytest.raises(ValueError, match="needs a distance: similarity 'dot'"):
    rerank_spec.check({"name": "k_reciprocal"}, "dot")
  assert rerank_spec.check(None) is None and rerank_spec.check({}) is None
  assert rerank_spec.check({"name": "dba"}) == {"name": "dba", "k": 2, "alpha": 3.0,
                                              "depth": rerank_spec.DEPTH}
  x, labels = clustered(4)
  index = retrieval.Index.build(x, similarity="dot", backend="exact")
  with pytest.raises(ValueError, match="needs a distance"):
    index.search(x[:2], 3, rerank={"name": "k_reciprocal"})


def _images(n=40, classes=8, seed=5):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), n // classes).astype(np.int32)
  centres = rng.integers(0, 256, (classes, 4, 4, 3))
  images = np.clip(centres[labels] + rng.integers(-160, 160, (n, 4, 4, 3)), 0, 255)
  return {"images": images.astype(np.uint8), "labels": labels}


def _embed(images):
  return np.asarray(images, np.float32).reshape(len(images), -1)


def test_evaluator_reranks_and_names_its_setting():
  query = _images()
  common = dict(task="single", towers={"query": 4}, ks=(1, 2), batch_size=8, picture=False,
                sets={"query": query, "gallery": None}, mesh=sharding.make_mesh())
  ev = retrieval_evaluator.Retrieval("retrieval", rerank=SPECS["alpha_qe"], **common)
  got = ev.run({"query": _embed}, step=1)
  x = _embed(query["images"])
  want = retrieval.evaluate(x, query["labels"], ks=(1, 2), rerank=SPECS["alpha_qe"],
                            metrics=("recall", "r_precision", "map@r"))
  assert want != retrieval.evaluate(x, query["labels"], ks=(1, 2),
                                    metrics=("recall", "r_precision", "map@r"))
  assert all(got[k] == pytest.approx(v) for k, v in want.items())
  with pytest.raises(ValueError, match=r"config.evals.retrieval.rerank: .*'kreciprocal'"):
    retrieval_evaluator.Retrieval("retrieval", rerank={"name": "kreciprocal"}, **common)


def test_a_smoke_run_evaluates_with_reranking(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from jaxdml import config as config_lib, metrics_writer, train  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config(os.path.join(root, "configs", "cub_proxy_anchor.py"), "smoke")
  config.total_steps = 1
  config.evals.retrieval.rerank = {"name": "dba", "k": 2, "alpha": 3.0}
  config.evals.retrieval.picture = False
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path)) if "recall@1" in r]
  assert rows and 0 <= rows[-1]["recall@1"] <= 1
  assert config_lib.as_dict(config_lib.resolve(config).evals.retrieval)["rerank"]["name"] == "dba"
