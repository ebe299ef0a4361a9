"""Tests for jaxdml.retrieval: metrics against pytorch-metric-learning's
AccuracyCalculator (faiss k-NN), exact search against numpy and across device
counts, ScaNN against exact, and the retrieval picture."""
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from PIL import Image
import pytest
import torch

from jaxdml import retrieval
from jaxdml.retrieval import exact, picture, scann_backend
from jaxdml.retrieval import metrics as metrics_lib
from jaxdml.tools.search_bench import make_clustered

faiss = pytest.importorskip("faiss")
accuracy_calculator = pytest.importorskip(
    "pytorch_metric_learning.utils.accuracy_calculator")
inference = pytest.importorskip("pytorch_metric_learning.utils.inference")

PML_NAMES = {"recall@1": "precision_at_1", "r_precision": "r_precision",
             "map@r": "mean_average_precision_at_r",
             "map": "mean_average_precision", "mrr": "mean_reciprocal_rank"}


def one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("data",))


def pml_metrics(q, ql, g=None, gl=None, *, similarity, full_map=False):
  """AccuracyCalculator's metrics with a faiss index matching `similarity`."""
  if similarity == "cosine":
    q, g = exact.prepare(q, "cosine"), (None if g is None else
                                         exact.prepare(g, "cosine"))
  index = faiss.IndexFlatL2 if similarity == "euclidean" else faiss.IndexFlatIP
  names = ["precision_at_1", "r_precision", "mean_average_precision_at_r",
           "mean_reciprocal_rank"]
  if full_map:
    names = ["mean_average_precision"]
  calc = accuracy_calculator.AccuracyCalculator(  # k=None: its default, the whole gallery
      include=tuple(names), knn_func=inference.FaissKNN(index_init_fn=index), device=None)
  res = calc.get_accuracy(q, ql, g, gl, ref_includes_query=False)
  return res


def random_set(seed, n, dim, classes):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, dim)).astype(np.float32),
          rng.integers(classes, size=n).astype(np.int32))


def tied_set(seed, n_classes=30, dim=16):
  """Each class is 2 points, each repeated 3 times: many exact ties, but only
  among items of one label, so no metric depends on the tie order."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n_classes * 2, dim)).astype(np.float32)
  x = np.repeat(base, 3, axis=0)
  labels = np.repeat(np.arange(n_classes, dtype=np.int32), 6)
  perm = rng.permutation(len(x))
  return x[perm], labels[perm]


DATA = {
    "random": lambda: random_set(0, 400, 16, 25),
    "clustered": lambda: make_clustered(500, 32, per_class=6, noise=1.2,
                                        seed=1),
    "ties": lambda: tied_set(2),
}


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_same_set_matches_accuracy_calculator(data, similarity):
  x, y = DATA[data]()
  ours = retrieval.evaluate(x, y, ks=(1,), similarity=similarity)
  peer = pml_metrics(x, y, similarity=similarity)
  for name in ("recall@1", "r_precision", "map@r", "mrr"):
    assert ours[name] == pytest.approx(peer[PML_NAMES[name]], abs=1e-6), name
  assert 0.0 < ours["recall@1"] < 1.0 or data == "ties"


@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_query_gallery_matches_accuracy_calculator(data, similarity):
  x, y = DATA[data]()
  q, ql, g, gl = x[:150], y[:150], x[150:], y[150:].copy()
  gl[gl == ql[0]] = 10_000  # a query with no relevant item: left out
  ours = retrieval.evaluate(q, ql, g, gl, ks=(1, 4), similarity=similarity)
  peer = pml_metrics(q, ql, g, gl, similarity=similarity)
  for name in ("recall@1", "r_precision", "map@r", "mrr"):
    assert ours[name] == pytest.approx(peer[PML_NAMES[name]], abs=1e-6), name


@pytest.mark.parametrize("same_set", [True, False])
def test_full_map_matches_accuracy_calculator(same_set):
  x, y = DATA["clustered"]()
  args = (x, y) if same_set else (x[:100], y[:100], x[100:], y[100:])
  ours = retrieval.evaluate(*args, metrics=("map",))
  peer = pml_metrics(*args, similarity="cosine", full_map=True)
  assert ours["map"] == pytest.approx(peer["mean_average_precision"], abs=1e-6)


def test_metrics_known_values():
  # Query 0 (label 1, R=2): hits at ranks 2 and 3. Query 1 (label 2, R=1):
  # hit at rank 1. Query 2 (label 3, R=0): left out of every average.
  nl = np.array([[0, 1, 1], [2, 0, 0], [0, 0, 0]])
  out = retrieval.metrics_from_neighbors(
      nl, np.array([1, 2, 3]), np.array([2, 1, 0]), ks=(1, 2),
      metrics=("recall", "r_precision", "map@r", "map"))
  assert out["recall@1"] == pytest.approx(0.5)
  assert out["recall@2"] == pytest.approx(1.0)
  assert out["r_precision"] == pytest.approx((0.5 + 1.0) / 2)
  assert out["map@r"] == pytest.approx((0.5 / 2 + 1.0) / 2)  # (1/2 * 1/2)
  assert out["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1.0) / 2)
  with pytest.raises(ValueError, match="search with k >= 4"):
    retrieval.metrics_from_neighbors(nl, np.array([1, 2, 3]),
                                     np.array([4, 1, 0]), ks=(1,))


def test_one_search_serves_two_label_sets():
  """Sketchy protocol: instance and category hits from one ranking."""
  rng = np.random.default_rng(3)
  photos = rng.normal(size=(60, 24)).astype(np.float32)
  instance = np.arange(60)
  category = instance // 10
  sketch_of = np.repeat(instance, 3)
  sketches = photos[sketch_of] + 0.8 * rng.normal(size=(180, 24))
  rel_cat = retrieval.count_relevant(category[sketch_of], category,
                                     same_set=False)
  assert np.all(rel_cat == 10)
  _, idx = retrieval.search(sketches, photos, 10)
  inst = retrieval.metrics_from_neighbors(
      instance[idx], sketch_of, np.ones(180, int), ks=(1, 5))
  cat = retrieval.metrics_from_neighbors(
      category[idx], category[sketch_of], rel_cat, ks=(1, 5))
  same = ("recall", "r_precision", "map@r")  # metrics_from_neighbors' defaults
  assert inst == pytest.approx(retrieval.evaluate(
      sketches, sketch_of, photos, instance, ks=(1, 5), metrics=same))
  assert cat == pytest.approx(retrieval.evaluate(
      sketches, category[sketch_of], photos, category, ks=(1, 5), metrics=same))
  assert cat["recall@1"] >= inst["recall@1"]


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_eight_devices_equal_one_and_numpy(similarity, exclude_self):
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(4)
  # Small integers: every score is exact in float32, so ties are real ties.
  g = rng.integers(-1, 2, size=(1037, 8)).astype(np.float32)
  q = g if exclude_self else rng.integers(-1, 2, size=(70, 8)).astype(
      np.float32)
  s8, i8 = retrieval.search(q, g, 9, exclude_self=exclude_self,
                            similarity=similarity)
  s1, i1 = retrieval.search(q, g, 9, exclude_self=exclude_self,
                            similarity=similarity, mesh=one_device_mesh())
  np.testing.assert_array_equal(i8, i1)
  np.testing.assert_array_equal(s8, s1)
  qq, gg = exact.prepare(q, similarity), exact.prepare(g, similarity)
  ref = qq.astype(np.float64) @ gg.T.astype(np.float64)
  if similarity == "euclidean":
    ref = -((qq[:, None] - gg[None]) ** 2).sum(-1)
  if exclude_self:
    np.fill_diagonal(ref, -np.inf)
  order = np.argsort(-ref, axis=1, kind="stable")[:, :9]  # ties: lower index
  if similarity == "cosine":  # normalised scores are not exact: compare values
    np.testing.assert_allclose(s8, np.take_along_axis(ref, order, 1),
                               atol=1e-6)
  else:
    np.testing.assert_array_equal(i8, order)
    np.testing.assert_array_equal(s8, np.take_along_axis(ref, order, 1))


def test_exact_streams_blocks_and_tiles():
  """Several query blocks and gallery tiles give the single-shot answer."""
  x, _ = random_set(5, 9000, 8, 10)
  # One device: the 9000 gallery rows span two 8192-row tiles.
  got = list(exact.search_blocks(x[:600], x, 5, exclude_self=True,
                                 block_size=128, mesh=one_device_mesh()))
  assert [s for s, _, _ in got] == [0, 128, 256, 384, 512]
  idx = np.concatenate([i for _, _, i in got])
  ref = exact.prepare(x[:600], "cosine") @ exact.prepare(x, "cosine").T
  ref[np.arange(600), np.arange(600)] = -np.inf
  np.testing.assert_array_equal(idx, np.argsort(-ref, 1, kind="stable")[:, :5])


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_leave_one_out_excludes_self_with_duplicates(backend):
  if backend == "scann":
    pytest.importorskip("scann")
  x, _ = random_set(6, 300, 12, 5)
  x[1] = x[0]
  x[2] = x[0]
  x[10:20] = x[9]
  _, idx = retrieval.search(x, x, 4, exclude_self=True, backend=backend)
  assert not np.any(idx == np.arange(300)[:, None])
  assert set(idx[0, :2]) == {1, 2} and set(idx[1, :2]) == {0, 2}
  assert set(idx[9]) <= set(range(10, 20))
  # Identical items of one label: each query still finds its twin.
  y = np.arange(300)
  y[[1, 2]] = 0
  res = retrieval.evaluate(x[:3], y[:3], ks=(1, 2), backend=backend)
  assert res["recall@1"] == 1.0 and res["r_precision"] == 1.0


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_scann_brute_force_equals_exact(similarity):
  pytest.importorskip("scann")
  x, _ = random_set(7, 2000, 16, 10)
  s_e, i_e = retrieval.search(x[:200], x, 5, similarity=similarity)
  s_s, i_s = retrieval.search(x[:200], x, 5, similarity=similarity,
                              backend="scann")
  np.testing.assert_array_equal(i_s, i_e)
  np.testing.assert_allclose(s_s, s_e, atol=1e-4)


def scann_vs_exact(num, dim, noise, scann_config=None):
  x, y = make_clustered(num, dim, noise=noise, seed=8)
  ex = retrieval.evaluate(x, y, ks=(1, 8))
  sc = retrieval.evaluate(x, y, ks=(1, 8), backend="scann",
                          scann_config=scann_config)
  return ex, sc


def test_scann_tree_close_to_exact():
  pytest.importorskip("scann")
  # The smallest gallery on the default tree + AH path, fast enough for the
  # default run; the 50k x 128 check is marked slow.
  assert not scann_backend.default_config(20_000, 9)["brute_force"]
  ex, sc = scann_vs_exact(20_000, 64, 1.05)
  assert 0.5 < ex["recall@1"] < 0.99
  assert abs(sc["recall@1"] - ex["recall@1"]) <= 0.002
  assert abs(sc["recall@8"] - ex["recall@8"]) <= 0.005


@pytest.mark.slow
def test_scann_default_close_to_exact_50k():
  pytest.importorskip("scann")
  assert not scann_backend.default_config(50_000, 9)["brute_force"]
  ex, sc = scann_vs_exact(50_000, 128, 1.25)
  assert 0.5 < ex["recall@1"] < 0.99
  print("50k x 128 recall@1 exact", ex["recall@1"], "scann", sc["recall@1"])
  assert abs(sc["recall@1"] - ex["recall@1"]) <= 0.002


def test_scann_audit_deepens_a_too_shallow_search():
  """One leaf of ~70 loses recall; the audit doubles leaves and re-scoring
  until the sample is within 0.1 points, and the full search follows."""
  pytest.importorskip("scann")
  x, y = make_clustered(5000, 32, noise=0.8, seed=3)  # exact recall@1 ~0.81
  shallow = {"brute_force": False, "num_leaves_to_search": 1, "reorder_k": 20,
             "audit_sample": 0}
  ex = retrieval.evaluate(x, y, ks=(1, 8))
  unaudited = retrieval.evaluate(x, y, ks=(1, 8), backend="scann", scann_config=shallow)
  assert ex["recall@1"] - unaudited["recall@1"] > 0.1  # the search is too shallow
  assert not any(name.startswith("scann/") for name in unaudited)
  audited = retrieval.evaluate(x, y, ks=(1, 8), backend="scann",
                               scann_config={**shallow, "audit_sample": 1000})
  assert audited["scann/target_met"] == 1 and audited["scann/sample_size"] == 1000
  assert audited["scann/num_leaves_to_search"] > 1
  assert audited["scann/sample_recall_gap@1"] <= 0.1
  assert 0.9 < audited["scann/sample_agreement"] <= 1.0
  # The sample is a fifth of the queries: the whole set stays close too.
  assert abs(audited["recall@1"] - ex["recall@1"]) <= 0.004


def test_scann_audit_without_labels_and_exact_fallback():
  """search() audits against the exact neighbours themselves; a target no
  setting can meet makes the whole search exact."""
  pytest.importorskip("scann")
  x, _ = make_clustered(3000, 16, noise=1.6, seed=4)
  cfg = {"brute_force": False, "num_leaves_to_search": 2, "audit_sample": 300}
  _, idx, report = retrieval.search_and_audit(x, x, 5, exclude_self=True,
                                              backend="scann", scann_config=cfg)
  assert report["scann/target_met"] == 1 and report["scann/sample_recall_gap@1"] <= 0.1
  assert idx.shape == (3000, 5)
  impossible = {**cfg, "audit_max_gap": -1.0}
  s, idx, report = retrieval.search_and_audit(x, x, 5, exclude_self=True,
                                              backend="scann", scann_config=impossible)
  assert report["scann/target_met"] == 0 and report["scann/fallback_exact"] == 1
  assert report["scann/num_leaves_to_search"] == scann_backend.resolve_config(
      3000, 6, "cosine", impossible)["num_leaves"]
  s_e, i_e = retrieval.search(x, x, 5, exclude_self=True)
  np.testing.assert_array_equal(idx, i_e)
  np.testing.assert_array_equal(s, s_e)


@pytest.mark.parametrize("k", [1, 5])
def test_chunked_top_k_equals_top_k_with_ties(k):
  """Chunk maxima prune the row without changing the answer: small integer
  scores make ties everywhere, masked -inf included."""
  rng = np.random.default_rng(0)
  raw = jnp.asarray(rng.integers(-3, 4, size=(40, 512)).astype(np.float32))
  mask = jnp.asarray(rng.random((40, 512)) < 0.3)
  mask = mask.at[7].set(True).at[8, :500].set(True)  # rows with few or no valid items

  def score(values, pos):
    return jnp.where(jnp.take_along_axis(mask, jnp.broadcast_to(pos, values.shape), 1),
                     -jnp.inf, values)
  got = exact._chunked_top_k(raw, score, k, 32)  # pylint: disable=protected-access
  want = jax.lax.top_k(jnp.where(mask, -jnp.inf, raw), k)
  np.testing.assert_array_equal(got[0], want[0])
  valid = np.isfinite(np.asarray(want[0]))  # among -inf, any position is right
  np.testing.assert_array_equal(np.asarray(got[1])[valid], np.asarray(want[1])[valid])


def test_scann_config_is_validated():
  cfg = scann_backend.resolve_config(100_000, 10, "cosine",
                                     {"num_leaves_to_search": 5000})
  assert not cfg["brute_force"] and cfg["num_leaves"] == 316
  assert cfg["num_leaves_to_search"] == 316 and cfg["reorder_k"] == 100
  assert scann_backend.default_config(5000, 10)["brute_force"]
  with pytest.raises(ValueError, match="Unknown scann_config keys"):
    scann_backend.resolve_config(100, 5, "cosine", {"leaves": 3})


def test_bad_inputs_raise_clear_errors():
  x, y = random_set(9, 50, 4, 5)
  with pytest.raises(ValueError, match="NaN or inf"):
    retrieval.search(np.full((2, 4), np.nan), x, 3)
  with pytest.raises(ValueError, match="query dim 3 != gallery dim 4"):
    retrieval.search(x[:, :3], x, 3)
  with pytest.raises(ValueError, match="k=50 must be in"):
    retrieval.search(x, x, 50, exclude_self=True)
  with pytest.raises(ValueError, match="backend='exact'"):
    retrieval.evaluate(x, y, metrics=("map",), backend="scann")
  with pytest.raises(ValueError, match="Unknown retrieval metrics"):
    retrieval.evaluate(x, y, metrics=("ndcg",))
  with pytest.raises(ValueError, match="labels must have shape"):
    retrieval.evaluate(x, y[:10])
  with pytest.raises(ValueError, match="backend="):
    retrieval.search(x, x, 3, backend="faiss")
  with pytest.raises(ValueError, match="similarity="):
    retrieval.search(x, x, 3, similarity="l1")


def test_retrieval_grid(tmp_path):
  rng = np.random.default_rng(10)
  queries = rng.integers(0, 256, size=(5, 40, 30, 3), dtype=np.uint8)
  gallery = rng.integers(0, 256, size=(20, 50, 50), dtype=np.uint8)  # gray
  indices = rng.integers(0, 20, size=(5, 4))
  hits = np.zeros((5, 4), bool)
  hits[:, 0] = True
  hits[2, 3] = True
  tile = 32
  path = retrieval.save_retrieval_grid(tmp_path / "sub" / "grid.png", queries,
                                       gallery, indices, hits,
                                       max_queries=3, tile=tile)
  img = np.asarray(Image.open(path).convert("RGB"))
  assert img.shape[1::-1] == picture.grid_size(3, 4, tile) == (
      4 + 36 * 5 + 16, 4 + 36 * 3)
  assert img.std() > 0
  fw = picture.frame_width(tile)
  for r in range(3):
    y = picture.GAP + r * (tile + picture.GAP)
    for c in range(4):
      x = picture.GAP + (c + 1) * (tile + picture.GAP) + picture.QUERY_GAP
      want = picture.GREEN if hits[r, c] else picture.RED
      frame = img[y:y + fw, x:x + tile]  # the top edge of the frame
      assert np.all(frame == want), (r, c)
      inner = img[y + fw:y + tile - fw, x + fw:x + tile - fw]
      assert inner.std() > 0  # the image itself, not a blank tile
  with pytest.raises(ValueError, match="must be uint8"):
    retrieval.save_retrieval_grid(tmp_path / "x.png", queries / 255.0,
                                  gallery, indices, hits)


def test_mrr_known_values():
  # Query 0: first hit at rank 2; query 1: rank 1; query 2: no hit in the
  # depth given; query 3: no relevant item, left out.
  nl = np.array([[0, 1, 1], [2, 0, 0], [0, 0, 4], [0, 0, 0]])
  out = retrieval.metrics_from_neighbors(nl, np.array([1, 2, 4, 3]), np.array([2, 1, 1, 0]),
                                         metrics=("mrr",))
  assert out["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
  hits = metrics_lib.relevance(np.array([1, 2, 4, 3]), nl)
  values, _ = metrics_lib.per_query(hits, np.array([2, 1, 1, 0]), (1,), ("mrr",), depth=2)
  np.testing.assert_allclose(values["mrr"], [1 / 2, 1, 0, 0])


def _separated_clusters(seed, classes=8, per_class=20, dim=12, noisy=0.1):
  """Well separated clusters whose labels are wrong for a fraction `noisy`:
  k-means' partition (the true clusters) is unambiguous and NMI/AMI are below 1."""
  rng = np.random.default_rng(seed)
  centres = 10.0 * rng.normal(size=(classes, dim))
  truth = np.repeat(np.arange(classes), per_class)
  x = centres[truth] + 0.3 * rng.normal(size=(len(truth), dim))
  labels = truth.copy()
  flip = rng.random(len(truth)) < noisy
  labels[flip] = rng.integers(0, classes, flip.sum())
  return x.astype(np.float32), labels.astype(np.int32), truth


def test_nmi_and_ami_score_the_clusters_as_accuracy_calculator_does():
  x, y, truth = _separated_clusters(0)
  ours = retrieval.evaluate(x, y, metrics=("nmi", "ami", "recall"), ks=(1,))
  # AccuracyCalculator's scoring of the true partition (its faiss k-means,
  # one random start, can merge two clusters here; ours must find them).
  calc = accuracy_calculator.AccuracyCalculator(
      include=("NMI", "AMI"), device=None,
      kmeans_func=lambda emb, k: torch.as_tensor(truth))
  peer = calc.get_accuracy(x, y, ref_includes_query=False)
  assert ours["nmi"] == pytest.approx(peer["NMI"], abs=1e-9)
  assert ours["ami"] == pytest.approx(peer["AMI"], abs=1e-9)
  assert 0.5 < ours["ami"] < ours["nmi"] < 1.0  # the flipped labels cost something
  assert "recall@1" in ours and "mrr" not in ours
  clean_x, clean_y, _ = _separated_clusters(1, noisy=0.0)
  assert retrieval.evaluate(clean_x, clean_y, metrics=("nmi", "ami")) == {
      "nmi": pytest.approx(1.0), "ami": pytest.approx(1.0)}
