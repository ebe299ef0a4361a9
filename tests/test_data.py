"""Tests for jaxdml.data: generator, samplers, augmentations, sources, pipeline."""
import itertools
import os

import ml_collections
import numpy as np
import pytest

from jaxdml import data, host, tasks
from jaxdml.data import augment, pipeline, samplers, sources, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(num_categories=6, photos_per_category=8, sketches_per_photo=2,
             test_photos_per_category=2, image_size=32, seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic_cache"))


@pytest.fixture(scope="module")
def small(cache_dir):
  return synthetic.load_or_generate(cache_dir, **SMALL)


def _config(cache_dir, **overrides):
  cfg = data.default_data_config()
  cfg.cache_dir = cache_dir
  cfg.synthetic = dict(SMALL)
  cfg.image_size = 32
  cfg.num_threads = 4
  for k, v in overrides.items():
    setattr(cfg, k, v) if "." not in k else setattr(cfg.augment, k.split(".")[1], v)
  return cfg


# ---------------------------------------------------------------- generator
def test_generate_shapes_dtypes_and_splits(small):
  c, p, s, t = 6, 8, 2, 2
  assert small["photos"].shape == (c * p, 32, 32, 3) and small["photos"].dtype == np.uint8
  assert small["sketches"].shape == (c * p * s, 32, 32, 3) and small["sketches"].dtype == np.uint8
  assert small["photo_category"].dtype == np.int32 and small["sketch_photo"].dtype == np.int32
  assert small["photo_split"].dtype == np.int8
  np.testing.assert_array_equal(np.bincount(small["photo_category"]), [p] * c)
  assert small["photo_split"].sum() == c * t
  for cat in range(c):  # the split is per category
    assert small["photo_split"][small["photo_category"] == cat].sum() == t
  np.testing.assert_array_equal(np.bincount(small["sketch_photo"]), [s] * (c * p))
  np.testing.assert_array_equal(small["sketch_category"], small["photo_category"][small["sketch_photo"]])


def test_generate_is_deterministic_and_seeded(small):
  again = synthetic.generate(**SMALL)
  for k in small:
    np.testing.assert_array_equal(small[k], again[k])
  other = synthetic.generate(**{**SMALL, "seed": 1, "num_categories": 2})
  assert not np.array_equal(other["photos"], small["photos"][:16])
  # Each photo has its own seed stream: more photos leave earlier ones alone.
  more = synthetic.generate(**{**SMALL, "num_categories": 1, "photos_per_category": 9})
  np.testing.assert_array_equal(more["photos"][:8], small["photos"][:8])


def test_images_are_not_blank_and_sketches_look_like_sketches(small):
  photos, sketches = small["photos"].astype(float), small["sketches"].astype(float)
  assert (photos.reshape(len(photos), -1).std(1) > 10).all()
  ink = (sketches[..., 0] < 200).mean((1, 2))  # dark strokes on white
  assert (ink > 0.01).all() and (ink < 0.35).all(), (ink.min(), ink.max())
  assert (np.median(sketches, axis=(1, 2, 3)) > 240).all()
  assert (sketches[..., 0] == sketches[..., 1]).all()  # grey strokes
  own = photos[small["sketch_photo"]]
  assert np.abs(own - sketches).mean() > 40


def test_sketches_carry_their_photos_instance_geometry(small):
  # Nearest neighbour among the sketches of a category (blurred stroke maps):
  # mostly a sibling of the same photo, so instance retrieval is learnable.
  ink = (255 - small["sketches"][..., 0].astype(np.float32)) / 255
  k = np.ones(5) / 5
  blur = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, ink)
  blur = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 2, blur).reshape(len(ink), -1)
  blur /= np.linalg.norm(blur, axis=1, keepdims=True)
  sim = blur @ blur.T
  np.fill_diagonal(sim, -np.inf)
  same_cat = small["sketch_category"][:, None] == small["sketch_category"][None]
  sim[~same_cat] = -np.inf
  hit = small["sketch_photo"][sim.argmax(1)] == small["sketch_photo"]
  assert hit.mean() > 0.6, hit.mean()  # chance within a category: 1/15


def test_bad_generator_arguments_raise():
  with pytest.raises(ValueError, match="num_categories"):
    synthetic.generate(num_categories=99)
  with pytest.raises(ValueError, match="test_photos_per_category"):
    synthetic.generate(photos_per_category=4, test_photos_per_category=4)


def test_load_or_generate_caches_atomically(tmp_path):
  kw = dict(num_categories=2, photos_per_category=3, sketches_per_photo=1,
            test_photos_per_category=1, image_size=16)
  first = synthetic.load_or_generate(str(tmp_path), **kw)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npz") and "tmp" not in files[0]
  second = synthetic.load_or_generate(str(tmp_path), **kw)
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
  synthetic.load_or_generate(str(tmp_path), **{**kw, "seed": 3})
  assert len(os.listdir(tmp_path)) == 2  # the key includes every argument
  with pytest.raises(TypeError, match="unknown synthetic"):
    synthetic.load_or_generate(str(tmp_path), colour="red")


# ---------------------------------------------------------------- samplers
def test_pair_batches_distinct_photos_own_sketches_and_epochs():
  sketch_photo = np.repeat(np.arange(50), 3)
  groups = samplers.group_rows(sketch_photo)
  eligible = np.flatnonzero(np.arange(50) % 5)  # 40 photos
  n, b = 40, 12
  seen = []
  for step in range(10):  # 120 positions = exactly 3 epochs, 3 seams inside batches
    photos, sketches = samplers.pair_batch_indices(eligible, groups, batch_size=b, seed=7, step=step)
    assert len(np.unique(photos)) == b and np.isin(photos, eligible).all()
    np.testing.assert_array_equal(sketch_photo[sketches], photos)
    seen.append(photos)
  seen = np.concatenate(seen)
  for e in range(3):  # every epoch visits every eligible photo once
    np.testing.assert_array_equal(np.sort(seen[e * n:(e + 1) * n]), eligible)
  again = samplers.pair_batch_indices(eligible, groups, batch_size=b, seed=7, step=4)
  np.testing.assert_array_equal(again[0], seen[48:60])
  other = samplers.pair_batch_indices(eligible, groups, batch_size=b, seed=8, step=4)
  assert not np.array_equal(other[0], seen[48:60])
  with pytest.raises(ValueError, match="2\\*batch_size"):
    samplers.pair_batch_indices(eligible, groups, batch_size=21, seed=0, step=0)


def test_pair_batches_stay_distinct_at_many_seams():
  groups = samplers.group_rows(np.arange(23))
  for b in (5, 8, 11):
    for step in range(300):
      photos, _ = samplers.pair_batch_indices(np.arange(23), groups, batch_size=b, seed=1, step=step)
      assert len(np.unique(photos)) == b, (b, step)


def test_m_per_class_structure_and_errors():
  labels = np.repeat(np.arange(10), [2, 7, 5, 4, 9, 3, 6, 8, 5, 4]) + 100
  groups = samplers.group_rows(labels)
  counts = np.zeros(110)
  for step in range(400):
    idx = samplers.m_per_class_batch_indices(labels, m=4, batch_size=16, seed=3, step=step,
                                             label_groups=groups)
    lab = labels[idx].reshape(4, 4)
    assert (lab == lab[:, :1]).all() and len(np.unique(lab[:, 0])) == 4
    for row, cls in zip(idx.reshape(4, 4), lab[:, 0]):
      n_in_class = (labels == cls).sum()  # no repeats unless the class is too small
      assert len(np.unique(row)) == 4 if n_in_class >= 4 else len(np.unique(row)) <= n_in_class
    counts[lab[:, 0]] += 1
  freq = counts[100:] / counts.sum()
  assert np.abs(freq - 0.1).max() < 0.04  # classes drawn uniformly
  same = samplers.m_per_class_batch_indices(labels, m=4, batch_size=16, seed=3, step=5)
  np.testing.assert_array_equal(same, samplers.m_per_class_batch_indices(
      labels, m=4, batch_size=16, seed=3, step=5, label_groups=groups))
  with pytest.raises(ValueError, match="multiple"):
    samplers.m_per_class_batch_indices(labels, m=3, batch_size=16, seed=0, step=0)
  with pytest.raises(ValueError, match="only 10 classes"):
    samplers.m_per_class_batch_indices(labels, m=1, batch_size=16, seed=0, step=0)


def test_m_per_class_matches_pytorch_metric_learning_semantics():
  pml_samplers = pytest.importorskip("pytorch_metric_learning.samplers")
  labels = np.repeat(np.arange(12), [2, 7, 5, 4, 9, 3, 6, 8, 5, 4, 6, 6])
  pml = pml_samplers.MPerClassSampler(labels, m=4, batch_size=16, length_before_new_iter=400)
  assert len(pml) == samplers.m_per_class_steps_per_epoch(16, 400) * 16
  ours = np.concatenate([samplers.m_per_class_batch_indices(labels, m=4, batch_size=16, seed=0, step=s)
                         for s in range(25)])
  for rows in (np.asarray(list(iter(pml))), ours):  # the same batch structure in both
    lab = labels[rows].reshape(-1, 4, 4)
    assert (lab == lab[..., :1]).all()
    assert all(len(np.unique(batch[:, 0])) == 4 for batch in lab)
    big = np.bincount(labels)[labels[rows.reshape(-1, 4)[:, 0]]] >= 4
    assert all(len(np.unique(r)) == 4 for r in rows.reshape(-1, 4)[big])


def test_process_rows_concatenate_to_global_batch():
  batch = {"a": np.arange(24), "b": np.arange(48).reshape(24, 2)}
  parts = [samplers.process_rows(batch, process_index=p, process_count=4) for p in range(4)]
  for k in batch:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
  with pytest.raises(ValueError, match="divisible"):
    samplers.process_rows(batch, process_index=0, process_count=5)


# ---------------------------------------------------------------- augment
def _smooth_image(size=200):
  yy, xx = np.mgrid[0:size, 0:size] / size
  img = np.stack([128 + 100 * np.sin(6 * xx), 128 + 100 * np.cos(5 * yy), 255 * xx * yy], -1)
  return img.astype(np.uint8)


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = augment.random_resized_crop_box(rng, 120, 200, scale=(0.2, 1.0))
    assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 120
    assert 0.19 <= w * h / (120 * 200) <= 1.0 and 0.7 <= w / h <= 1.4
  # An impossible ratio falls back to the largest centred crop, as torchvision.
  assert augment.random_resized_crop_box(rng, 100, 100, ratio=(3.0, 4.0)) == (0, 33, 100, 33)


def test_coupled_views_downscale_matches_low_resolution():
  hi, lo = augment.coupled_views(_smooth_image(), np.random.default_rng(1), num_views=6, hi=96,
                                 lo=48, color_jitter=(0.4, 0.4, 0.4, 0.1))
  assert hi.shape == (6, 96, 96, 3) and lo.shape == (6, 48, 48, 3) and hi.dtype == np.uint8
  from PIL import Image
  for h, l in zip(hi, lo):
    down = np.asarray(Image.fromarray(h).resize((48, 48), Image.BILINEAR)).astype(float)
    err = np.abs(down - l).mean()
    assert err < 4.0, err
    flipped = np.abs(down[:, ::-1] - l).mean()  # a flip mismatch would be far off
    assert flipped > 3 * err + 1 or np.allclose(l, l[:, ::-1], atol=8)


def test_color_jitter_neutral_factors_and_eval_transform():
  img = _smooth_image(64)
  ident = ((3, 0, 1, 2), (1.0, 1.0, 1.0, None))
  np.testing.assert_array_equal(augment.apply_color_jitter(img, ident), img)
  assert np.abs(augment.adjust_hue(img, 0.0).astype(int) - img).max() <= 8  # 8-bit HSV round trip
  assert np.abs(augment.adjust_hue(img, 0.5).astype(int) - img).mean() > 40
  red = np.array([[[200, 50, 50]]], np.uint8)  # known values: a third of a turn
  np.testing.assert_allclose(augment.adjust_hue(red, 1 / 3), [[[50, 200, 50]]], atol=3)
  back = augment.adjust_hue(augment.adjust_hue(img, 0.25), -0.25)
  assert np.abs(back.astype(int) - img).mean() < 2
  ev = augment.eval_transform(np.zeros((300, 400, 3), np.uint8), size=224)
  assert ev.shape == (224, 224, 3)
  assert augment.jitter_strengths(0.4) == (0.4, 0.4, 0.4, 0.0)
  with pytest.raises(ValueError, match="color_jitter"):
    augment.jitter_strengths((0.4, 0.4))


def test_normalize_known_values():
  x = np.array([[[0, 255, 128]]], np.uint8)
  out = np.asarray(data.normalize(x))
  expect = (np.array([0, 1, 128 / 255]) - np.array(data.MEAN)) / np.array(data.STD)
  np.testing.assert_allclose(out[0, 0], expect, rtol=1e-6)
  assert out.dtype == np.float32


# ---------------------------------------------------------------- pipeline
def _take(it, n):
  return list(itertools.islice(it, n))


def test_sbir_batches_pair_sketches_with_their_photos(cache_dir, small):
  cfg = _config(cache_dir, **{"augment.random_resized_crop": False, "augment.flip": False})
  batch = next(data.train_batches(cfg, seed=0, global_batch_size=8, start_step=0, task="sbir"))
  assert batch["sketch"].shape == (8, 32, 32, 3) and batch["photo"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and len(np.unique(batch["label"])) == 8
  assert (small["photo_split"][batch["label"]] == 0).all()  # train photos only
  np.testing.assert_array_equal(batch["photo"], small["photos"][batch["label"]])
  for sk, pid in zip(batch["sketch"], batch["label"]):
    own = small["sketches"][small["sketch_photo"] == pid]
    assert any(np.array_equal(sk, o) for o in own)


def test_sbir_pairs_share_one_flip_drawn_before_their_crops(cache_dir):
  """A pair's photo and sketch: random resized crops rendered into the
  batch, mirrored together or not at all; the reference crops each
  unflipped and mirrors afterwards, with the same draws."""
  from jaxdml.data import seeding
  cfg = _config(cache_dir)
  seed, step, b = 4, 3, 8
  batch = next(data.train_batches(cfg, seed=seed, global_batch_size=b, start_step=step,
                                  task="sbir"))
  splits = pipeline._open(cfg)
  idx = pipeline._sbir_plan(cfg, splits, b, seed)[0](step)
  aug = {k: v for k, v in pipeline._augment_kwargs(cfg).items() if k != "flip"}
  flips = []
  for j, rng in enumerate(seeding.row_generators([seed, pipeline._AUG, step], np.arange(b))):
    flipped = rng.random() < 0.5
    for key, split, rows in (("photo", "train_photos", idx[0]), ("sketch", "train_sketches", idx[1])):
      want = augment.train_transform(splits[split].lazy_image(rows[j]), rng, size=32, flip=False,
                                     **aug)
      np.testing.assert_array_equal(batch[key][j], want[:, ::-1] if flipped else want)
    flips.append(flipped)
  assert 0 < sum(flips) < b


def test_resume_and_processes_reproduce_the_uninterrupted_run(cache_dir):
  cfg = _config(cache_dir, **{"augment.color_jitter": 0.3})
  kw = dict(seed=5, global_batch_size=8, task="sbir")
  full = _take(data.train_batches(cfg, start_step=0, **kw), 6)
  resumed = _take(data.train_batches(cfg, start_step=4, **kw), 2)
  cfg.num_threads = 1
  shares = [_take(data.train_batches(cfg, start_step=2, process_index=p, process_count=2, **kw), 2)
            for p in range(2)]
  for k in full[0]:
    for got, want in zip(resumed, full[4:]):
      np.testing.assert_array_equal(got[k], want[k])
    for s in range(2):  # augmentations depend on the global row, not the process
      np.testing.assert_array_equal(np.concatenate([shares[0][s][k], shares[1][s][k]]), full[2 + s][k])
  assert not np.array_equal(full[0]["photo"], full[1]["photo"])


@pytest.mark.parametrize("task, views", [
    ("single", None), ("sbir", None),
    ("single", dict(num=3, hi=32, lo=16, mixup=0.2, on_device=True)),
    ("single", dict(num=3, hi=32, lo=16, mixup=0.2, on_device=False))])
def test_a_batch_holds_its_examples_made_one_by_one(cache_dir, task, views):
  """A batch's examples are rendered straight into its rows
  (`pipeline._make_batch`); each row must equal the example made alone."""
  cfg = _config(cache_dir, m_per_class=2)
  cfg.views = views
  if views:
    cfg.augment.color_jitter = (0.4, 0.4, 0.4, 0.1)
  batch = next(data.train_batches(cfg, seed=3, global_batch_size=4, start_step=2, task=task))
  plan = pipeline._sbir_plan if task == "sbir" else pipeline._single_plan
  indices, example, joined = plan(cfg, pipeline._open(cfg), 4, 3)
  alone = [example(indices(2), row, np.random.default_rng([3, pipeline._AUG, 2, row]))
           for row in range(4)]
  join = np.concatenate if joined == pipeline.CONCATENATE else np.stack
  assert sorted(batch) == sorted(alone[0])
  for k, got in batch.items():
    np.testing.assert_array_equal(got, join([e[k] for e in alone]), err_msg=k)


def test_a_worker_renders_its_batch_into_shared_memory_it_sends_by_name():
  """In a worker process (`shared`), a batch's large arrays live in the
  worker's recycled shared memory and leave as `Handle`s, pickled down the
  worker's pipe as a name; small ones (labels) are pickled whole. A batch
  that fails frees its segment for the next."""
  import pickle  # pylint: disable=g-import-not-at-top
  from jaxdml.data.workers import shared_batches  # pylint: disable=g-import-not-at-top

  def make(step, j, rng, rows=None):
    del rng, rows
    return {"image": np.full((256, 256, 3), step * 10 + j, np.uint8), "label": np.int32(j)}

  def generators(step):
    return [np.random.default_rng([step, j]) for j in range(8)]

  batch = pipeline._make_batch(make, generators, 3, concatenate=False, shared_min_bytes=1 << 20)
  assert isinstance(batch["image"], shared_batches.Handle)
  assert type(batch["label"]) is np.ndarray  # 32 bytes: pickled, no segment
  message = pickle.dumps(batch)  # what the worker's pipe carries
  assert len(message) < 1024  # a name, not 8 x 256 x 256 x 3 pixels
  sent = pickle.loads(message)
  received = shared_batches.Mappings().open_arrays(sent)
  np.testing.assert_array_equal(received["image"][:, 5, 7], np.repeat(30 + np.arange(8)[:, None], 3, 1))
  name = batch["image"].name
  del received, sent, batch

  def broken(step, j, rng, rows=None):
    if j == 5:
      raise RuntimeError("a bad file")
    return make(step, j, rng, rows)

  with pytest.raises(RuntimeError, match="a bad file"):
    pipeline._make_batch(broken, generators, 4, concatenate=False, shared_min_bytes=1 << 20)
  again = pipeline._make_batch(make, generators, 4, concatenate=False, shared_min_bytes=1 << 20)
  assert again["image"].name == name  # the failed batch's segment, freed, then reused


def test_single_and_views_batches(cache_dir):
  cfg = _config(cache_dir, m_per_class=2)
  batch = next(data.train_batches(cfg, seed=0, global_batch_size=8, start_step=0, task="single"))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
  lab = batch["label"].reshape(4, 2)
  assert (lab == lab[:, :1]).all() and len(np.unique(lab[:, 0])) == 4 and lab.max() < 6
  cfg.views = dict(num=3, hi=32, lo=16, mixup=0.2, on_device=False)
  cfg.augment.color_jitter = (0.4, 0.4, 0.4, 0.1)
  host = next(data.train_batches(cfg, seed=0, global_batch_size=4, start_step=0, task="single"))
  assert host["image_hi"].shape == (12, 32, 32, 3) and host["image_lo"].shape == (12, 16, 16, 3)
  lab = host["label"].reshape(4, 3)
  assert (lab == lab[:, :1]).all()
  # The default: crops and parameters for the train step, which makes the
  # views (tasks.device_views) close to the host's from the same draws.
  cfg.views.on_device = True
  shipped = next(data.train_batches(cfg, seed=0, global_batch_size=4, start_step=0,
                                    task="single"))
  assert shipped["crops_hi"].shape == (12, 32, 32, 3) and "image_lo" not in shipped
  assert shipped["jitter_order"].shape == shipped["jitter_factors"].shape == (12, 4)
  assert shipped["mixup_lambda"].shape == (12,)
  np.testing.assert_array_equal(shipped["label"], host["label"])
  made = tasks.device_views(shipped, cfg.views["lo"])
  for key, bound in (("image_hi", 2.0), ("image_lo", 2.5)):
    assert made[key].shape == host[key].shape
    assert np.mean(np.abs(np.asarray(made[key]) - host[key])) < bound, key


def test_eval_sets_synthetic(cache_dir, small):
  cfg = _config(cache_dir)
  ev = data.eval_sets(cfg, task="sbir")
  q, g = ev["query"], ev["gallery"]
  test_rows = np.flatnonzero(small["photo_split"] == 1)
  np.testing.assert_array_equal(g["labels"], test_rows)
  np.testing.assert_array_equal(g["images"], small["photos"][test_rows])
  assert q["images"].shape == (len(test_rows) * 2, 32, 32, 3) and q["labels"].dtype == np.int32
  assert np.isin(q["labels"], g["labels"]).all()
  np.testing.assert_array_equal(q["categories"], small["photo_category"][q["labels"]])
  single = data.eval_sets(cfg, task="single")
  assert single["gallery"] is None
  np.testing.assert_array_equal(single["query"]["labels"], small["photo_category"][test_rows])
  assert data.eval_sets(cfg, task="single", image_size=48)["query"]["images"].shape[1:] == (48, 48, 3)


def test_bad_task_and_dataset_names():
  cfg = data.default_data_config()
  with pytest.raises(ValueError, match="task"):
    data.train_batches(cfg, seed=0, global_batch_size=8, start_step=0, task="pairs")
  cfg.name = "cub"
  with pytest.raises(ValueError, match="sketch/photo"):
    data.eval_sets(cfg, task="sbir")
  with pytest.raises(ValueError, match="unknown data set"):
    sources.canonical_name("imagenet")


# ---------------------------------------------------------------- TFDS sources
def test_missing_tfds_dataset_error_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    sources.open_splits("sop", data_dir=str(tmp_path))
  msg = str(err.value)
  assert "jaxdml_sop" in msg and str(tmp_path) in msg
  assert f"python -m jaxdml.data_prep.build sop --manual_dir=/path/to/your/download --data_dir={tmp_path}" in msg
  assert "demo" in msg and "synthetic_sketchy" in msg


def _tiny_cub(tmp_path, monkeypatch, image, *, train=8, encoding="png", extra=None):
  """A TFDS set under `jaxdml_cub`'s name in `tmp_path`: `train` images
  `image(i, offset)` (test: 4 from offset 10), labels `offset + i // 2`;
  `extra`: more features, `{name: (feature, value(i, offset))}`."""
  extra = extra or {}
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  # The stand-in takes the real builder's name for this test only: a private
  # registry copy, restored afterwards, so data_prep's builder is unaffected.
  monkeypatch.setattr(registered, "_DATASET_REGISTRY", {
      k: v for k, v in registered._DATASET_REGISTRY.items() if k != "jaxdml_cub"})

  class JaxdmlCub(tfds.core.GeneratorBasedBuilder):  # a stand-in under the real name
    VERSION = tfds.core.Version("0.0.1")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding),
          "label": tfds.features.Scalar(np.int64), "name": tfds.features.Text(),
          **{k: feature for k, (feature, _) in extra.items()}}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, train), "test": self._generate_examples(10, 4)}

    def _generate_examples(self, offset, n):
      for i in range(n):
        yield i, {"image": image(i, offset), "label": offset + i // 2, "name": f"x{i}",
                  **{k: value(i, offset) for k, (_, value) in extra.items()}}

  JaxdmlCub(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()


def test_tiny_tfds_dataset_through_sources_and_pipeline(tmp_path, monkeypatch):
  _tiny_cub(tmp_path, monkeypatch, lambda i, offset: np.full((20 + i, 30, 3), 10 * i + offset, np.uint8))
  splits = sources.open_splits("jaxdml_cub", data_dir=str(tmp_path))
  train = splits["train"]
  assert len(train) == 8 and sorted(train.field("label")) == [0, 0, 1, 1, 2, 2, 3, 3]
  for i in range(8):  # decoded image i belongs to its record's label
    assert train.image(i)[0, 0, 0] // 20 == train.field("label")[i]
    # The stored file, read past TFDS's decoding, is the one TFDS reads.
    assert train.lazy_image(i).data == bytes(train._encoded[i]["image"])
  cfg = data.default_data_config()
  cfg.name, cfg.data_dir, cfg.image_size, cfg.m_per_class, cfg.num_threads = "cub", str(tmp_path), 16, 2, 2
  batch = next(data.train_batches(cfg, seed=0, global_batch_size=4, start_step=0, task="single"))
  assert batch["image"].shape == (4, 16, 16, 3)
  for im, lab in zip(batch["image"], batch["label"]):
    assert int(np.median(im)) // 20 == lab
  ev = data.eval_sets(cfg, task="single")
  assert ev["gallery"] is None and ev["query"]["images"].shape == (4, 16, 16, 3)
  imgs = np.asarray(ev["query"]["images"])
  i = imgs[:, 0, 0, 0].astype(int) // 10 - 1  # test image i has value 10 * i + 10
  np.testing.assert_array_equal(10 + i // 2, ev["query"]["labels"])


def test_records_parse_as_tensorflow_parses_them_and_workers_do_not_import_it(tmp_path,
                                                                               monkeypatch):
  """A worker process reads records without TensorFlow (~470 MB and ~3 s
  each): the pickled source carries array_record's file list, and
  `tf_example` parses what TensorFlow's own Example parser does."""
  import pickle  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  from jaxdml.data import tf_example  # pylint: disable=g-import-not-at-top

  def values(example):
    return {k: (f.WhichOneof("kind"), list(getattr(f, f.WhichOneof("kind")).value))
            for k, f in example.features.feature.items()}

  _tiny_cub(tmp_path, monkeypatch, lambda i, offset: np.full((20 + i, 30, 3), i, np.uint8))
  train = sources.open_splits("jaxdml_cub", data_dir=str(tmp_path))["train"]
  made = example_pb2.Example()  # every kind of feature, the float list packed
  made.features.feature["f"].float_list.value.extend([0.5, -2.0])
  made.features.feature["i"].int64_list.value.extend([-3, 2**40])
  made.features.feature["b"].bytes_list.value.extend([b"", b"\xff\x00"])
  for record in [train._records[i] for i in range(len(train))] + [made.SerializeToString()]:
    ours, theirs = tf_example.example_class().FromString(record), example_pb2.Example.FromString(record)
    assert values(ours) == values(theirs) and len(values(ours)) >= 3
  assert values(tf_example.example_class().FromString(made.SerializeToString()))["f"] == (
      "float_list", [0.5, -2.0])
  with pytest.raises(KeyError, match="no feature 'photo'.*'image', 'label', 'name'"):
    tf_example.feature_bytes(train._records[0], "photo")

  in_worker = ("import pickle, sys\n"
               "source = pickle.loads(sys.stdin.buffer.read())\n"
               "sys.stdout.buffer.write(source.encoded_image(3))\n"
               "assert not {'tensorflow', 'tensorflow_datasets'} & set(sys.modules)")
  read = subprocess.run([sys.executable, "-c", in_worker], input=pickle.dumps(train),
                        capture_output=True, check=False, cwd=ROOT)
  assert read.returncode == 0, read.stderr.decode()[-2000:]
  assert read.stdout == train.encoded_image(3) == bytes(train._encoded[3]["image"])


def test_sampler_fields_are_the_integer_scalars_tfds_decodes(tmp_path, monkeypatch):
  """The labels read at start-up (`tf_example`, no TFDS decoding) are the
  data set's integer scalar features, with the values TFDS decodes; integer
  lists, booleans and text are not fields, even where a list holds one value."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  extra = {"kind": (tfds.features.ClassLabel(names=["a", "b", "c"]), lambda i, o: i % 3),
           "small": (tfds.features.Scalar(np.int32), lambda i, o: -i),
           "big": (tfds.features.Scalar(np.int64), lambda i, o: 2**40 + i),  # cast as before
           "boxes": (tfds.features.Tensor(shape=(None,), dtype=np.int64), lambda i, o: [i]),
           "crowd": (tfds.features.Scalar(np.bool_), lambda i, o: i % 2 == 0)}
  _tiny_cub(tmp_path, monkeypatch, lambda i, offset: np.full((8, 9, 3), i, np.uint8), extra=extra)
  train = sources.open_splits("jaxdml_cub", data_dir=str(tmp_path))["train"]
  decoded = [train._encoded[i] for i in range(len(train))]  # TFDS's decoding, the reference
  assert sorted(train._meta) == ["big", "kind", "label", "small"]
  for name, values in train._meta.items():
    assert values.dtype == np.int32
    np.testing.assert_array_equal(values, np.asarray([d[name] for d in decoded]).astype(np.int32))
  # Records are stored in TFDS's shuffled order; each one's fields agree.
  i = -train.field("small")
  assert sorted(i) == list(range(8))
  np.testing.assert_array_equal(train.field("kind"), i % 3)
  np.testing.assert_array_equal(train.field("big"), i)  # 2**40 + i in int32, as before
  from jaxdml.data import tf_example  # pylint: disable=g-import-not-at-top
  two = tf_example.example_class()()
  two.features.feature["label"].int64_list.value.extend([1, 2])
  for records, bad in (([train._records[0], b""], r"record 1 .* 'label' \(features: \[\]\)"),
                       ([two.SerializeToString()], r"record 0 .* 'label' \(features: \['label'\]\)")):
    with pytest.raises(ValueError, match=bad + ".*prepare it again"):
      tf_example.int64_scalars(records, ["label"])


def test_jpeg_batches_are_the_same_from_region_decodes_threads_and_processes(tmp_path, monkeypatch):
  """Stored JPEGs through the whole pipeline: crops decoded over their
  rectangle (`_jpeg_region`) in threads and in worker processes equal the
  whole-image decodes'."""
  textures = np.random.default_rng(0).integers(0, 256, (16, 12, 3, 3))

  def image(i, offset):  # a textured 120x90 or 90x120 photo
    from PIL import Image  # pylint: disable=g-import-not-at-top
    size = (120, 90) if i % 2 else (90, 120)
    return np.asarray(Image.fromarray(textures[i].astype(np.uint8)).resize(size, Image.BICUBIC))

  _tiny_cub(tmp_path, monkeypatch, image, train=16, encoding="jpeg")
  cfg = data.default_data_config()
  cfg.name, cfg.data_dir, cfg.image_size, cfg.m_per_class = "cub", str(tmp_path), 32, 2
  cfg.augment.scale = (0.1, 0.6)  # small crops: the region decoder has rows and columns to skip

  def batches(threads, workers):
    cfg.num_threads, cfg.num_workers = threads, workers
    it = data.train_batches(cfg, seed=1, global_batch_size=8, start_step=2, task="single")
    return [next(it)["image"] for _ in range(3)]

  # Two threads in each worker: the default one-thread worker, with no pool
  # of its own, is compared in test_worker_processes_make_the_same_batches_as_threads.
  in_threads, in_processes = batches(2, 0), batches(2, 2)
  monkeypatch.setattr(augment, "_jpeg_region", None)
  whole = batches(2, 0)
  for a, b, c in zip(in_threads, in_processes, whole):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  assert np.std(whole[0].astype(float)) > 10  # the crops carry texture, not a flat colour


@pytest.mark.parametrize("on_device,function,key", [
    (False, "coupled_views", "image_hi"), (True, "coupled_crops", "crops_hi")])
def test_views_mix_each_view_with_its_own_partner(cache_dir, monkeypatch, on_device, function,
                                                  key):
  """RAML's code draws a mixup partner image per view, not one per image."""
  calls = []
  real = getattr(augment, function)

  def recording(image, rng, *, num_views, **kw):
    calls.append(num_views)
    return real(image, rng, num_views=num_views, **kw)

  monkeypatch.setattr(augment, function, recording)
  cfg = _config(cache_dir, m_per_class=2)
  cfg.views = dict(num=3, hi=32, lo=16, mixup=0.2, on_device=on_device)
  # One example, built the way train_batches builds each (its threads would
  # prefetch more while the calls are counted).
  indices, example, _ = pipeline._single_plan(cfg, pipeline._open(cfg), 4, 0)
  views = example(indices(0), 0, np.random.default_rng(0))
  assert views[key].shape == (3, 32, 32, 3)
  assert calls == [3, 1, 1, 1], calls


RECIPES = ["cub_obdsd.py", "cub_irt.py", "sop_xbn.py", "cub_proxy_anchor.py", "cub_raml.py",
           "sketchy_rtl.py"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipes_training_crop_is_random_on_non_square_images(recipe):
  """The full recipes' own augmentation settings on 500x375 and 375x500
  images (CUB's shapes): the crop must move with the seed, never be stuck on
  the centre crop (IRT's (224/256)^2, aspect-1 box never fit such images)."""
  from jaxdml import config as config_lib
  config = config_lib.load_config(os.path.join(ROOT, "configs", recipe))
  aug = pipeline._augment_kwargs(config.data)
  size = int(config.data.image_size)
  views = config.data.get("views")
  rng = np.random.default_rng(0)
  for shape in ((375, 500, 3), (500, 375, 3)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    outputs = []
    for seed in range(6):
      r = np.random.default_rng(seed)
      if views:
        aug.pop("random_resized_crop", None), aug.pop("resize_square", None)
        hi, lo = augment.coupled_views(image, r, num_views=1, hi=int(views["hi"]),
                                       lo=int(views["lo"]), **{**aug, "flip": False})
        out = lo[0]
      else:
        out = augment.train_transform(image, r, size=size, **{**aug, "flip": False})
      assert out.shape == (size, size, 3)
      outputs.append(out)
    assert len({o.tobytes() for o in outputs}) == len(outputs), recipe


def test_irt_crop_is_a_random_crop_of_the_image_resized_to_256():
  """IRT: resize to 256 x 256 (aspect not kept), random 224 crop, flip: the
  training transform with IRT's own settings is exactly those steps, its
  crop moving over all of the square."""
  import cv2
  from jaxdml import config as config_lib
  config = config_lib.load_config(os.path.join(ROOT, "configs", "cub_irt.py"))
  assert config.data.augment.resize_square == 256 and config.data.image_size == 224
  aug = pipeline._augment_kwargs(config.data)
  corners, flips = set(), set()
  for shape in ((375, 500, 3), (500, 375, 3)):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    square = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR)
    for seed in range(12):
      got = augment.train_transform(image, np.random.default_rng(seed), size=224, **aug)
      draws = np.random.default_rng(seed)
      left, top = augment.square_crop_offsets(draws, resize=256, size=224)
      want = square[top:top + 224, left:left + 224]
      flipped = draws.random() < 0.5
      np.testing.assert_array_equal(got, want[:, ::-1] if flipped else want)
      corners.add((left, top))
      flips.add(flipped)
  assert len(corners) >= 10 and flips == {False, True}
  with pytest.raises(ValueError, match="resize_square=200 is smaller than the crop"):
    augment.square_crop_offsets(np.random.default_rng(0), resize=200, size=224)


def test_worker_processes_make_the_same_batches_as_threads(cache_dir, monkeypatch):
  """`num_workers` moves the work into worker processes; the batch of
  step s must stay the pure function of (seed, s) that resume relies on.
  Images arrive in the shared memory the workers rendered them into, and a
  worker reuses a segment once the training process drops its batch: over
  48 batches the workers create at most 20 segments, not 48 (`/dev/shm` names
  carry the creating worker's pid). The labels, under the threshold, come
  pickled. A stopped worker unlinks its segments."""
  import gc  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline, "_SHARED_MIN_BYTES", 1024)  # 8 x 32 x 32 x 3 images: 24 KiB
  cfg = data.default_data_config()
  cfg.cache_dir, cfg.image_size, cfg.num_threads = cache_dir, 32, 1  # the default worker

  def segments(pids):
    return {p for pid in pids for p in glob.glob(f"/dev/shm/jaxdml_{pid}_*")}

  def first(workers, start, count):
    cfg.num_workers = workers
    earlier = {p.pid for p in multiprocessing.active_children()}  # other tests' workers
    it = data.train_batches(cfg, seed=3, global_batch_size=8, start_step=start, task="single")
    batches, seen = [], set()
    for _ in range(count):
      batch = next(it)
      assert workers == 0 or not batch["image"].flags.owndata
      batches.append({k: v.copy() for k, v in batch.items()})
      del batch
      ours = [p for p in multiprocessing.active_children() if p.pid not in earlier]
      seen |= segments(p.pid for p in ours)
    return batches, seen, it, ours

  threads = first(0, 5, 16)[0]
  processes, seen, it, ours = first(2, 5, 48)
  for a, b in zip(threads, processes):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  if os.path.isdir("/dev/shm"):  # Linux lists POSIX shared memory there
    # At most 5 per worker, however many batches: 4 made ahead (the pool's
    # 2 x `prefetch` credits, the ones being made included; any one worker
    # may hold them all), 1 in this loop.
    assert 2 <= len(seen) <= 10, sorted(seen)
    del it
    gc.collect()
    for p in ours:
      p.join(timeout=30)
    assert not segments(p.pid for p in ours)


def test_worker_processes_make_batches_without_jax(cache_dir):
  """A worker needs NumPy, the decoders and the records, not JAX: importing
  it cost each worker ~120 MB and ~1 s of start-up (docs/benchmarks.md).
  Its loaded libraries are listed in /proc."""
  if not os.path.isdir("/proc"):
    pytest.skip("a worker's libraries are listed from /proc")
  cfg = data.default_data_config()
  cfg.cache_dir, cfg.image_size, cfg.num_threads, cfg.num_workers = cache_dir, 32, 1, 2
  cfg.views = dict(num=2, hi=32, lo=16, mixup=0.2)  # RAML's device-augmentation keys too
  it = data.train_batches(cfg, seed=0, global_batch_size=4, start_step=0, task="single")
  try:
    assert augment.CROPS in next(it) and augment.MIXUP in next(it)  # one from each worker
    for process in it.processes:
      with open(f"/proc/{process.pid}/maps") as maps:
        libraries = maps.read()
      assert "numpy" in libraries and "jaxlib" not in libraries, process.pid
  finally:
    it.close()


def test_worker_batches_close_and_a_script_holding_them_exits_cleanly(cache_dir, tmp_path):
  """`close()` stops the workers. A script that still holds a worker pipeline
  when it ends exits without teardown tracebacks and without
  segments left to Python's resource tracker (both printed on most exits)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config()
  cfg.cache_dir, cfg.image_size, cfg.num_threads, cfg.num_workers = cache_dir, 32, 1, 2
  earlier = {p.pid for p in multiprocessing.active_children()}
  it = data.train_batches(cfg, seed=0, global_batch_size=8, start_step=0, task="single")
  next(it), next(it)  # one from each worker
  ours = [p for p in multiprocessing.active_children() if p.pid not in earlier]
  assert len(ours) == 2
  it.close()
  assert not any(p.is_alive() for p in ours)
  with pytest.raises(ValueError, match="batches were closed"):
    next(it)

  script = tmp_path / "holds_batches.py"  # 224 px batches: in shared memory
  script.write_text(
      "from jaxdml import data\n"
      "if __name__ == '__main__':\n"
      "  cfg = data.default_data_config()\n"
      f"  cfg.cache_dir, cfg.image_size, cfg.num_workers = {cache_dir!r}, 224, 2\n"
      "  batches = data.train_batches(cfg, seed=0, global_batch_size=8, start_step=0,\n"
      "                               task='single')\n"
      "  for _ in range(3):\n"
      "    assert not next(batches)['image'].flags.owndata\n"
      "  print('done')\n")
  for _ in range(2):
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-3000:]
    assert "Exception ignored" not in run.stderr and "leaked" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("cores,gib,workers,threads", [
    (1, 64, 0, 1), (2, 64, 2, 1), (3, 64, 3, 1), (8, 64, 8, 1), (100, 400, 100, 1),
    (240, 400, 240, 1), (16, 8, 8, 2), (100, 30, 30, 3), (4, 1, 2, 2), (8, 0, 2, 4)])
def test_worker_processes_are_picked_from_the_cores_and_memory(monkeypatch, cores, gib, workers,
                                                                threads):
  monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
  monkeypatch.setattr(host, "available_memory_bytes", lambda: gib << 30)
  cfg = data.default_data_config()
  assert cfg.num_workers == -1 and cfg.num_threads == 0
  assert data.worker_layout(cfg) == (0, min(32, cores))  # the embedded set stays in memory
  cfg.name = "cub"  # files: one worker per core, one per GiB available, at least 2
  assert data.worker_layout(cfg) == (workers, threads)
  assert data.num_threads(cfg) == min(32, cores)  # evaluation in this process uses every core
  cfg.num_workers = 0  # threads only: one per core, at most 32
  assert data.worker_layout(cfg) == (0, min(32, cores)) and data.num_threads(cfg) == min(32, cores)
  cfg.num_workers, cfg.num_threads = 3, 5
  assert data.worker_layout(cfg) == (3, 5) and data.num_threads(cfg) == 5
