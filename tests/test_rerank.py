"""Tests for jaxdml.retrieval.rerank against numpy transcriptions of each
method's reference: alpha-QE and DBA as Radenovic et al. define them (full
similarity matrices, a second full search), k-reciprocal as Zhong et al.'s
`re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`
(zhunzhong07/person-re-ranking, python-version/re_ranking_ranklist.py),
line by line on dense matrices. The re-rankers see top-k lists only; where
those lists hold what the reference reads, results must be equal."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from jaxdml import retrieval
from jaxdml.retrieval import exact, rerank

NUM_QUERY, NUM_GALLERY, DIM = 6, 40, 8


def clustered(num, seed, *, classes=5):
  """Raw embeddings around a few class centres, rows of varied norm."""
  rng = np.random.default_rng(seed)
  centres = 2.0 * np.random.default_rng(0).normal(size=(classes, DIM))
  x = centres[rng.integers(classes, size=num)] + 0.8 * rng.normal(size=(num, DIM))
  return (x * rng.uniform(0.5, 3.0, size=(num, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  return clustered(NUM_QUERY, 1), clustered(NUM_GALLERY, 2)


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_alpha_qe(q, g, n, alpha):
  """The paper's alpha-QE: expand with the top n of a full search, search again."""
  q, g = unit(q), unit(g)
  sims = q @ g.T
  top = np.argsort(-sims, axis=1)[:, :n]
  weights = np.take_along_axis(sims, top, axis=1) ** alpha
  expanded = unit(q + np.einsum("qn,qnd->qd", weights, g[top]))
  return expanded @ g.T


def reference_dba(q, g, k, alpha):
  """alpha-DBA: every database vector augmented by its own top k, then a full search."""
  q, g = unit(q), unit(g)
  sims = g @ g.T
  top = np.argsort(-sims, axis=1)[:, 1:k + 1]  # rank 0 is the item itself
  weights = np.take_along_axis(sims, top, axis=1) ** alpha
  return q @ unit(g + np.einsum("gn,gnd->gd", weights, g[top])).T


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
  original_dist = np.concatenate(
      [np.concatenate([q_q_dist, q_g_dist], axis=1),
       np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
  query_num = q_g_dist.shape[0]
  return reference_body(original_dist, query_num, k1, k2, lambda_value)[:, query_num:]


def reference_body(original_dist, query_num, k1, k2, lambda_value):
  """The reference from its union matrix on; its last column slice is the caller's."""
  original_dist = np.power(original_dist, 2).astype(np.float32)
  original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
  V = np.zeros_like(original_dist).astype(np.float32)
  initial_rank = np.argsort(original_dist).astype(np.int32)
  gallery_num = original_dist.shape[0]
  all_num = gallery_num
  for i in range(all_num):
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    k_reciprocal_index = forward_k_neigh_index[fi]
    k_reciprocal_expansion_index = k_reciprocal_index
    for j in range(len(k_reciprocal_index)):
      candidate = k_reciprocal_index[j]
      candidate_forward_k_neigh_index = initial_rank[candidate, :int(np.around(k1 / 2.)) + 1]
      candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                      :int(np.around(k1 / 2.)) + 1]
      fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
      candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
      if (len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index))
          > 2. / 3 * len(candidate_k_reciprocal_index)):
        k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                 candidate_k_reciprocal_index)
    k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
    weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
    V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
  original_dist = original_dist[:query_num, ]
  if k2 != 1:
    V_qe = np.zeros_like(V, dtype=np.float32)
    for i in range(all_num):
      V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
    V = V_qe
  invIndex = [np.where(V[:, i] != 0)[0] for i in range(gallery_num)]
  jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
    indNonZero = np.where(V[i, :] != 0)[0]
    indImages = [invIndex[ind] for ind in indNonZero]
    for j in range(len(indNonZero)):
      temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
          V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
    jaccard_dist[i] = 1 - temp_min / (2. - temp_min)
  return jaccard_dist * (1 - lambda_value) + original_dist * lambda_value


def assert_ranking(scores, indices, expected_scores):
  """Rows ranked as `expected_scores` [Q, G] ranks them, with its values."""
  order = np.argsort(-expected_scores, axis=1, kind="stable")
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_allclose(scores, np.take_along_axis(expected_scores, order, 1),
                             rtol=1e-5, atol=1e-5)


def assert_permutation_best_first(scores, indices, candidates):
  np.testing.assert_array_equal(np.sort(indices, 1), np.sort(candidates, 1))
  assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("n, alpha", [(2, 3.0), (5, 1.0)])
def test_alpha_qe_matches_reference(data, n, alpha):
  q, g = data
  _, full = retrieval.search(q, g, NUM_GALLERY)
  scores, indices = rerank.alpha_qe(q, g, full, n=n, alpha=alpha)
  assert_ranking(scores, indices, reference_alpha_qe(q, g, n, alpha))
  assert indices.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("k, alpha, exclude_self", [(2, 3.0, False), (4, 1.0, True)])
def test_dba_matches_reference(data, k, alpha, exclude_self):
  q, g = data
  _, full = retrieval.search(q, g, NUM_GALLERY)
  # With the item itself in its own list (exclude_self=False) it is skipped.
  _, own = retrieval.search(g, g, k + 3, exclude_self=exclude_self)
  scores, indices = rerank.dba(q, g, full, own, k=k, alpha=alpha)
  assert_ranking(scores, indices, reference_dba(q, g, k, alpha))


def test_zero_expansion_is_the_identity(data):
  q, g = data
  scores, indices = retrieval.search(q, g, 10)
  for fn in (lambda: rerank.alpha_qe(q, g, indices, n=0),
             lambda: rerank.dba(q, g, indices, retrieval.search(g, g, 3)[1], k=0)):
    new_scores, new_indices = fn()
    np.testing.assert_array_equal(new_indices, indices)
    np.testing.assert_allclose(new_scores, scores, atol=1e-6)


def test_reranked_lists_are_permutations_best_first(data):
  q, g = data
  _, short = retrieval.search(q, g, 12)
  _, own = retrieval.search(g, g, 5, exclude_self=True)
  results = {"alpha_qe": rerank.alpha_qe(q, g, short, n=3),
             "dba": rerank.dba(q, g, short, own, k=3),
             "k_reciprocal": rerank.k_reciprocal(q, g, short,
                                                 rerank.union_neighbors(q, g, 21))}
  for name, (scores, indices) in results.items():
    assert scores.shape == indices.shape == short.shape, name
    assert_permutation_best_first(scores, indices, short)
    assert not np.array_equal(indices, short), f"{name} moved nothing"


def reference_distances(q, g, similarity):
  q, g = (exact.prepare(x, similarity).astype(np.float64) for x in (q, g))
  return cdist(q, g), cdist(q, q), cdist(g, g)


@pytest.mark.parametrize("k1, k2, lambda_value, similarity, normalization, depth", [
    (20, 6, 0.3, "cosine", "farthest", 21),        # the paper's setting; lists of k1 + 1
    (7, 1, 0.5, "euclidean", "farthest", 8),       # no local expansion; odd k1
    (5, 9, 0.2, "euclidean", "list", None),        # k2 > k1 + 1; whole rows listed
])
def test_k_reciprocal_matches_reference(data, k1, k2, lambda_value, similarity,
                                        normalization, depth):
  q, g = data
  _, full = retrieval.search(q, g, NUM_GALLERY, similarity=similarity)
  neighbors = rerank.union_neighbors(q, g, depth or NUM_QUERY + NUM_GALLERY,
                                     similarity=similarity)
  scores, indices = rerank.k_reciprocal(
      q, g, full, neighbors, k1=k1, k2=k2, lambda_value=lambda_value,
      similarity=similarity, normalization=normalization)
  final = reference_re_ranking(*reference_distances(q, g, similarity), k1=k1, k2=k2,
                               lambda_value=lambda_value)
  assert_ranking(scores, indices, -final)


def test_k_reciprocal_same_set_matches_reference(data):
  x = np.concatenate(data)
  _, loo = retrieval.search(x, x, len(x) - 1, exclude_self=True)
  neighbors = rerank.union_neighbors(x, None, 21, exclude_self=True)  # itself added back
  scores, indices = rerank.k_reciprocal(x, None, loo, neighbors)
  g_g = reference_distances(x, x, "cosine")[0]
  final = reference_body(g_g, len(x), 20, 6, 0.3)
  np.fill_diagonal(final, np.inf)  # leave-one-out: never its own result
  order = np.argsort(final, axis=1, kind="stable")[:, :-1]
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_allclose(-scores, np.take_along_axis(final, order, 1), atol=1e-5)


def test_k_reciprocal_lambda_one_keeps_the_distance_order(data):
  q, g = data
  _, short = retrieval.search(q, g, 15, similarity="euclidean")
  neighbors = rerank.union_neighbors(q, g, 21, similarity="euclidean")
  _, indices = rerank.k_reciprocal(q, g, short, neighbors, lambda_value=1.0,
                                   similarity="euclidean")
  np.testing.assert_array_equal(indices, short)


def test_bad_hyperparameters_name_the_problem(data):
  q, g = data
  _, short = retrieval.search(q, g, 4)
  _, own = retrieval.search(g, g, 3)
  neighbors = rerank.union_neighbors(q, g, 21)
  cases = [
      (lambda: rerank.alpha_qe(q, g, short, n=-1), "n must be an integer >= 0"),
      (lambda: rerank.alpha_qe(q, g, short, n=2.5), "n must be an integer"),
      (lambda: rerank.alpha_qe(q, g, short, n=5), "search with k >= 5"),
      (lambda: rerank.alpha_qe(q, g, short, alpha=-1.0), "alpha must be"),
      (lambda: rerank.alpha_qe(q, g, short, alpha="3"), "alpha must be"),
      (lambda: rerank.dba(q, g, short, own, k=3), r"k >= 4"),
      (lambda: rerank.dba(q, g, short, own[:5], k=1), r"gallery_indices must be"),
      (lambda: rerank.alpha_qe(q, g, short - 10), "outside"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors, k1=0), "k1 must be"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors, k2=0), "k2 must be"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors, lambda_value=1.5),
       r"lambda_value must be in \[0, 1\]"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors, similarity="dot"),
       "needs a distance"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors, normalization="max"),
       "normalization="),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors[:, :10]),
       r"union_neighbors\(query, gallery, 21\)"),
      (lambda: rerank.k_reciprocal(q, g, short, neighbors[:NUM_QUERY]),
       r"neighbors must be an integer \[46, k\]"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
