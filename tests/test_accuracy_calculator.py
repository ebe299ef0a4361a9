"""`retrieval.evaluate` against pytorch-metric-learning's AccuracyCalculator
(2.9.0, faiss k-NN) on the same arrays, option by option: its default depth
(k=None, the whole gallery), k="max_bin_count" and an int k, avg_of_avgs,
return_per_class, label_comparison_fn, exclude and a calculate_* extension;
the full-depth first-hit ranks against brute force; NMI/AMI by invariants
(the k-means differ)."""
import jax
from jax.sharding import Mesh
import numpy as np
import pytest
import torch

from jaxdml import retrieval
from jaxdml.retrieval import clustering, exact, scann_backend
from jaxdml.tools.search_bench import make_clustered

faiss = pytest.importorskip("faiss")
accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
inference = pytest.importorskip("pytorch_metric_learning.utils.inference")

PML_NAMES = {"recall@1": "precision_at_1", "r_precision": "r_precision",
             "map@r": "mean_average_precision_at_r", "map": "mean_average_precision",
             "mrr": "mean_reciprocal_rank"}
ALL = ("recall", "r_precision", "map@r", "map", "mrr")
# PML averages MRR in float32 (the rest in float64): a 1e-7 relative error,
# where one first hit moved from rank 100 to 101 in 160 queries moves it 6e-7.
ATOL = 2e-7


def _labels(kind, rng, n):
  if kind == "balanced":
    return rng.permutation(np.arange(n) % 20)
  if kind == "long_tail":  # one class of 40 down to singletons (lone queries)
    sizes = [40, 25, 12, 8, 5, 3, 2, 2, 1, 1, 1]
    return rng.permutation(np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
                           .tolist() + list(range(100, 100 + n - sum(sizes))))
  raise ValueError(kind)


def labelled_set(kind, seed=0, n=160, dim=8):
  """Random embeddings: first hits often lie deep, so MRR's depth matters."""
  if kind == "clustered":
    x, y = make_clustered(n, dim, per_class=5, noise=1.5, seed=seed)
    return x, y
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, dim)).astype(np.float32), _labels(kind, rng, n).astype(np.int32)


def split(x, y, n_query=60):
  return x[:n_query], y[:n_query], x[n_query:], y[n_query:]


def pml(q, ql, g=None, gl=None, *, calculator=accuracy_calculator.AccuracyCalculator,
        include=tuple(PML_NAMES.values()), **options):
  """AccuracyCalculator with a faiss inner-product index on unit rows (cosine)."""
  unit = lambda v: None if v is None else exact.prepare(v, "cosine")
  calc = calculator(include=include, device=torch.device("cpu"),
                    knn_func=inference.FaissKNN(index_init_fn=faiss.IndexFlatIP), **options)
  return calc.get_accuracy(unit(q), ql, unit(g), gl)


def assert_equal(ours, peer, names=PML_NAMES, prefix=""):
  for name, peer_name in names.items():
    np.testing.assert_allclose(ours[prefix + name], peer[peer_name], rtol=0, atol=ATOL,
                               err_msg=name)


def one_device_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize("kind", ["balanced", "long_tail", "clustered"])
def test_mrr_default_is_accuracy_calculators_whole_gallery(kind):
  """k=None ranks the whole gallery; queries missing the search's top-k get
  their first hit from the full-depth pass, in both protocols."""
  x, y = labelled_set(kind)
  for args in ((x, y), split(x, y)):
    peer = pml(*args)
    assert_equal(retrieval.evaluate(*args, ks=(1,)), peer,
                 {n: PML_NAMES[n] for n in ("recall@1", "r_precision", "map@r", "mrr")})
    only_mrr = retrieval.evaluate(*args, metrics=("mrr",))  # a top-1 search: most miss
    assert only_mrr["mrr"] == pytest.approx(peer["mean_reciprocal_rank"], abs=ATOL)
    shallow = retrieval.evaluate(*args, metrics=("mrr",), k="max_bin_count")
    assert shallow["mrr"] == pytest.approx(pml(*args, k="max_bin_count")[
        "mean_reciprocal_rank"], abs=ATOL)
    if kind != "clustered":  # first hits beyond the largest class: the depths differ
      assert shallow["mrr"] < only_mrr["mrr"] - 1e-3


@pytest.mark.parametrize("same_set", [True, False])
def test_k_options_equal_accuracy_calculator(same_set):
  """Every metric at k=None, "max_bin_count" and an int below the largest
  class (r_precision and map@r then cut short, with PML's warning)."""
  x, y = labelled_set("long_tail", seed=1)
  args = (x, y) if same_set else split(x, y, n_query=70)
  for k in (None, "max_bin_count", 3):
    peer = pml(*args, k=k)
    if k == 3:
      with pytest.warns(UserWarning, match="k=3 is below the largest relevant count"):
        ours = retrieval.evaluate(*args, ks=(1,), metrics=ALL, k=k)
    else:
      ours = retrieval.evaluate(*args, ks=(1,), metrics=ALL, k=k)
    assert_equal(ours, peer)


@pytest.mark.parametrize("same_set", [True, False])
def test_avg_of_avgs_and_return_per_class_equal_accuracy_calculator(same_set):
  x, y = labelled_set("long_tail", seed=2)
  args = (x, y) if same_set else split(x, y, n_query=70)
  ours = retrieval.evaluate(*args, ks=(1, 4), metrics=ALL, avg_of_avgs=True)
  assert_equal(ours, pml(*args, avg_of_avgs=True))
  per_class = retrieval.evaluate(*args, ks=(1,), metrics=ALL, return_per_class=True)
  peer = pml(*args, return_per_class=True)
  q_labels = args[1]
  rel = retrieval.count_relevant(q_labels, args[-1], same_set=same_set)
  classes = np.unique(q_labels[rel > 0])
  for name, peer_name in PML_NAMES.items():
    assert len(per_class[name]) == len(classes) > 5
    np.testing.assert_allclose(per_class[name], peer[peer_name], atol=ATOL, err_msg=name)
    # The per-class mean is avg_of_avgs; per query it is the plain mean.
    assert np.mean(per_class[name]) == pytest.approx(ours[name], abs=1e-12)
  plain = retrieval.evaluate(*args, ks=(1,), metrics=ALL)
  assert any(abs(plain[n] - ours[n]) > 1e-3 for n in PML_NAMES)


def _coarse(a, b):
  """Hierarchical relevance: the same superclass (column 0), for numpy and torch."""
  return a[..., 0] == b[..., 0]


@pytest.mark.parametrize("same_set", [True, False])
def test_label_comparison_fn_equals_accuracy_calculator(same_set):
  """[N, 2] labels (superclass, class) with a custom relevance; MRR's deep
  first hits then come from the host pass."""
  x, fine = labelled_set("balanced", seed=3)
  labels = np.stack([fine % 4, fine], axis=1)
  args = (x, labels) if same_set else split(x, labels)
  ours = retrieval.evaluate(*args, ks=(1,), metrics=ALL, label_comparison_fn=_coarse)
  assert_equal(ours, pml(*args, label_comparison_fn=_coarse))
  only_mrr = retrieval.evaluate(*args, metrics=("mrr",), label_comparison_fn=_coarse)
  assert only_mrr["mrr"] == pytest.approx(ours["mrr"], abs=1e-12)
  per_class = retrieval.evaluate(*args, ks=(1,), metrics=ALL, label_comparison_fn=_coarse,
                                 return_per_class=True)
  assert_equal(per_class, pml(*args, label_comparison_fn=_coarse, return_per_class=True))
  # The coarse relevance is not the fine one.
  fine_args = (args[0], args[1][:, 1]) + ((args[2], args[3][:, 1]) if len(args) > 2 else ())
  assert retrieval.evaluate(*fine_args, ks=(1,))["recall@1"] < ours["recall@1"]


class _WithPrecisionAt5(accuracy_calculator.AccuracyCalculator):
  """PML's documented extension: one more calculate_* method."""

  def calculate_precision_at_5(self, knn_labels, query_labels, not_lone_query_mask,
                               label_counts, **kwargs):
    knn_labels, query_labels = accuracy_calculator.try_getting_not_lone_labels(
        knn_labels, query_labels, not_lone_query_mask)
    return accuracy_calculator.precision_at_k(
        knn_labels, query_labels[:, None], 5, self.avg_of_avgs, self.return_per_class,
        self.label_comparison_fn)

  def requires_knn(self):
    return super().requires_knn() + ["precision_at_5"]


@pytest.mark.filterwarnings("ignore:k=5 is below")  # map@r at k=5: cut short, as PML's
def test_custom_metric_and_exclude_equal_accuracy_calculator():
  x, y = labelled_set("long_tail", seed=4)
  seen = {}

  def precision_at_5(*, hits, neighbor_indices, relevant_counts, **kwargs):
    seen.update(hits=hits.shape, indices=neighbor_indices.shape, keys=set(kwargs))
    return hits[:, :5].mean(axis=1)
  results = {}
  for avg_of_avgs in (False, True):
    ours = retrieval.evaluate(x, y, ks=(1,), metrics=ALL, exclude=("r_precision", "map"),
                              custom_metrics={"precision_at_5": precision_at_5}, k=5,
                              avg_of_avgs=avg_of_avgs)
    peer = pml(x, y, calculator=_WithPrecisionAt5, k=5, avg_of_avgs=avg_of_avgs,
               include=("precision_at_1", "mean_average_precision_at_r",
                        "mean_reciprocal_rank", "precision_at_5"))
    assert sorted(ours) == ["map@r", "mrr", "precision_at_5", "recall@1"]
    assert_equal(ours, peer, {"recall@1": "precision_at_1", "mrr": "mean_reciprocal_rank",
                              "precision_at_5": "precision_at_5"})
    results[avg_of_avgs] = ours["precision_at_5"]
  assert results[True] != pytest.approx(results[False])
  assert seen["hits"] == seen["indices"] == (len(x), 5)  # read k deep
  assert seen["keys"] == {"neighbor_labels", "neighbor_scores", "query_labels"}
  alone = retrieval.evaluate(x, y, metrics=(), k=5,
                             custom_metrics={"precision_at_5": precision_at_5})
  assert alone == {"precision_at_5": pytest.approx(results[False], abs=1e-12)}


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
def test_first_hit_ranks_equal_brute_force(similarity):
  """Rows of four +-1 and two 0 (norm 2, so unit rows are exact too): exact
  ties everywhere, broken by the lower gallery index on 8 devices, 1 device
  (two gallery tiles) and the host."""
  rng = np.random.default_rng(5)

  def rows(n):
    signs = rng.choice([-1.0, 1.0], size=(n, 6)).astype(np.float32)
    signs[np.arange(n)[:, None], np.argsort(rng.random((n, 6)), axis=1)[:, :2]] = 0.0
    return signs
  g = rows(8300)  # over exact._MAX_TILE: two tiles on one device
  g_labels = rng.integers(0, 200, size=len(g))
  for same_set in (True, False):
    q = g[:90] if same_set else rows(50)
    q_labels = g_labels[:90] if same_set else rng.integers(0, 210, size=50)
    self_rows = np.arange(len(q)) if same_set else None
    qq, gg = exact.prepare(q, similarity), exact.prepare(g, similarity)
    scores = qq.astype(np.float64) @ gg.T.astype(np.float64)
    if similarity == "euclidean":
      scores = -((qq[:, None] - gg[None]) ** 2).sum(-1)
    if same_set:
      np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :len(g) - int(same_set)]
    hits = g_labels[order] == q_labels[:, None]
    want = np.where(hits.any(1), hits.argmax(1) + 1, 0)
    assert (want == 0).any() == (not same_set) and want.max() > 300
    got = {
        "8 devices": exact.first_hit_ranks(q, g, q_labels, g_labels, self_rows=self_rows,
                                           similarity=similarity, block_size=32),
        "1 device": exact.first_hit_ranks(q, g, q_labels, g_labels, self_rows=self_rows,
                                          similarity=similarity, mesh=one_device_mesh()),
        "host": exact.first_hit_ranks_numpy(
            q, g, lambda rows: g_labels[None, :] == q_labels[rows][:, None],
            self_rows=self_rows, similarity=similarity, block_size=16)}
    for where, ranks in got.items():
      np.testing.assert_array_equal(ranks, want, err_msg=f"{where} same_set={same_set}")


def _separated(seed, classes=6, per_class=30, dim=16):
  rng = np.random.default_rng(seed)
  centres = 20.0 * rng.normal(size=(classes, dim))
  truth = np.repeat(np.arange(classes), per_class)
  return (centres[truth] + 0.3 * rng.normal(size=(len(truth), dim))).astype(np.float32), truth


def test_nmi_ami_invariants_with_accuracy_calculators_kmeans():
  """Perfect clusters score 1, shuffled labels about 0, for ours (seeded
  scikit-learn k-means) and PML's (faiss k-means, one start: on other draws
  it can merge two clusters)."""
  x, truth = _separated(1)
  shuffled = np.random.default_rng(1).permutation(truth)
  for labels, perfect in ((truth, True), (shuffled, False)):
    peer = pml(x, labels, include=("NMI", "AMI"))
    for seed in (0, 1):
      ours = retrieval.evaluate(x, labels, metrics=("nmi", "ami"), kmeans_seed=seed)
      for nmi, ami in ((ours["nmi"], ours["ami"]), (peer["NMI"], peer["AMI"])):
        if perfect:
          assert nmi == pytest.approx(1.0) and ami == pytest.approx(1.0)
        else:
          assert 0.0 <= nmi < 0.1 and abs(ami) < 0.03


def test_kmeans_seed_reaches_the_clustering():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(200, 8)).astype(np.float32), np.arange(200) % 10  # no clear clusters
  runs = {seed: retrieval.evaluate(x, y, metrics=("nmi", "ami"), kmeans_seed=seed)
          for seed in (0, 1)}
  for seed, got in runs.items():
    assert got == clustering.cluster_scores(x, y, seed=seed)
  assert runs[0]["nmi"] != runs[1]["nmi"]


@pytest.mark.filterwarnings("ignore:k=4 is below")
def test_scann_brute_force_equals_exact_at_every_depth():
  """Below ScaNN's tree threshold the search is brute force: the same
  neighbours, so every metric and depth, MRR's deep first hits included,
  equals the exact backend's."""
  pytest.importorskip("scann")
  x, y = labelled_set("long_tail", seed=7)
  for k in (None, 4):
    metrics = ALL if k else ("recall", "r_precision", "map@r", "mrr")
    want = retrieval.evaluate(x, y, ks=(1, 4), metrics=metrics, k=k)
    got = retrieval.evaluate(x, y, ks=(1, 4), metrics=metrics, k=k, backend="scann")
    assert got == pytest.approx(want, abs=1e-12)


def test_no_query_with_a_relevant_item_gives_nan_as_accuracy_calculator():
  x, y = labelled_set("balanced", seed=8, n=60)
  q, ql, g, gl = split(x, y, n_query=20)
  gl = gl + 1000  # no query label in the gallery
  ours = retrieval.evaluate(q, ql, g, gl, ks=(1,), metrics=ALL)
  peer = pml(q, ql, g, gl)
  assert all(np.isnan(ours[n]) and np.isnan(peer[p]) for n, p in PML_NAMES.items())
  per_class = retrieval.evaluate(q, ql, g, gl, ks=(1,), metrics=ALL, return_per_class=True)
  peer = pml(q, ql, g, gl, return_per_class=True)
  for name, peer_name in PML_NAMES.items():
    assert len(per_class[name]) == len(peer[peer_name]) == len(np.unique(ql))
    assert np.all(np.isnan(per_class[name])) and np.all(np.isnan(peer[peer_name]))


def test_scann_drops_self_as_accuracy_calculator():
  """scann_backend.drop_self after a k+1 search: the self hit, or the last
  column of rows without one, as PML's FaissKNN does."""
  indices = np.array([[0, 5, 7], [4, 1, 2], [9, 8, 6], [6, 3, 1]])
  scores = -np.arange(12, dtype=np.float32).reshape(4, 3)
  ours = scann_backend.drop_self(scores, indices)
  peer = inference.return_results(torch.tensor(scores), torch.tensor(indices), True)
  np.testing.assert_array_equal(ours[1], peer[1].numpy())
  np.testing.assert_array_equal(ours[0], peer[0].numpy())
  np.testing.assert_array_equal(ours[1], [[5, 7], [4, 2], [9, 8], [6, 1]])


def test_bad_options_raise_clear_errors():
  x, y = labelled_set("balanced", n=40)
  with pytest.raises(ValueError, match="k=0: pass None"):
    retrieval.evaluate(x, y, k=0)
  with pytest.raises(ValueError, match="k='max': pass None"):
    retrieval.evaluate(x, y, k="max")
  with pytest.raises(ValueError, match="k=True: pass None"):
    retrieval.evaluate(x, y, k=True)
  with pytest.raises(ValueError, match="k=40 is deeper than the 39 gallery items"):
    retrieval.evaluate(x, y, k=40)
  with pytest.raises(ValueError, match="mutually exclusive"):
    retrieval.evaluate(x, y, avg_of_avgs=True, return_per_class=True)
  with pytest.raises(ValueError, match="mutually exclusive"):  # PML refuses both too
    accuracy_calculator.AccuracyCalculator(avg_of_avgs=True, return_per_class=True)
  with pytest.raises(ValueError, match="label_comparison_fn does not define"):
    retrieval.evaluate(x, y, metrics=("nmi",), label_comparison_fn=np.equal)
  with pytest.raises(NotImplementedError, match="clustering \\+ custom label comparison"):
    accuracy_calculator.AccuracyCalculator(include=("NMI",), label_comparison_fn=torch.eq)
  with pytest.raises(ValueError, match=r"exclude names unknown metrics \['ndcg'\]"):
    retrieval.evaluate(x, y, exclude=("ndcg",))
  with pytest.raises(ValueError, match="'mean_reciprocal_rank' is 'mrr'"):
    retrieval.evaluate(x, y, metrics=("mean_reciprocal_rank",))
  with pytest.raises(ValueError, match=r"must return one value per query, float \[40\]"):
    retrieval.evaluate(x, y, k=3, custom_metrics={"bad": lambda hits, **_: hits})
  with pytest.raises(ValueError, match="must be a string other than the built-in"):
    retrieval.evaluate(x, y, custom_metrics={"mrr": lambda **_: 0})
  with pytest.raises(ValueError, match=r"need a label_comparison_fn"):
    retrieval.evaluate(x, np.stack([y, y], 1))
  with pytest.raises(ValueError, match="must give bool"):
    retrieval.evaluate(x, np.stack([y, y], 1), label_comparison_fn=lambda a, b: a == b)
  with pytest.raises(ValueError, match="use backend='exact', or pass an int k"):
    retrieval.evaluate(x, y, backend="scann", custom_metrics={"c": lambda hits, **_: hits[:, 0]})
