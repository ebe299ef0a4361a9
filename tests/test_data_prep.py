"""data_prep builders on tiny fake trees in each data set's official layout.

Each builder is built once per module (fixtures) and read back through
`tfds.data_source`, the way jaxdml's grain pipelines read it.
"""
import json
import os

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from jaxdml import data_prep
from jaxdml.data_prep import base, build, inshop, sketchy

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _img(path, color=RED, size=(12, 10), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _read(name, split, data_dir, **kw):
  ds = tfds.data_source(data_prep.TFDS_NAMES[name], split=split,
                        data_dir=data_dir, **kw)
  return [ds[i] for i in range(len(ds))]


def _by(rows, key):
  return {r[key].decode() if isinstance(r[key], bytes) else r[key]: r for r in rows}


def _build(tmp, name, manual, **kw):
  data_dir = str(tmp / "data")
  return build.build(name, manual_dir=str(manual), data_dir=data_dir, **kw), data_dir


# ----------------------------------------------------------------- trees
def _cub_tree(root):
  top = root / "CUB_200_2011"
  items = [("001.Albatross/a1.jpg", 1, RED), ("001.Albatross/a2.jpg", 1, RED),
           ("002.Auklet/b1.jpg", 2, GREEN), ("101.Wren/c1.jpg", 101, BLUE),
           ("200.Yellowthroat/d1.jpg", 200, BLUE)]
  for rel, _, color in items:
    _img(str(top / "images" / rel), color)
  # A grayscale JPEG and a palette PNG under a .jpg name: both must read as RGB.
  _img(str(top / "images/002.Auklet/gray.jpg"), mode="L")
  Image.new("RGB", (5, 7), BLUE).convert("P", palette=Image.ADAPTIVE).save(
      str(top / "images/101.Wren/pal.jpg"), format="PNG")
  items += [("002.Auklet/gray.jpg", 2, None), ("101.Wren/pal.jpg", 101, None)]
  _write(str(top / "images.txt"),
         "".join(f"{i} {rel}\n" for i, (rel, _, _) in enumerate(items, 1)))
  _write(str(top / "image_class_labels.txt"),
         "".join(f"{i} {c}\n" for i, (_, c, _) in enumerate(items, 1)))
  return items


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cub")
  _cub_tree(tmp / "manual")
  return _build(tmp, "cub", tmp / "manual")


def test_cub_splits_labels_and_images(cub):
  report, data_dir = cub
  assert report["counts"] == {"train": 4, "test": 3}
  train = _by(_read("cub", "train", data_dir), "file_name")
  test = _by(_read("cub", "test", data_dir), "file_name")
  assert {k: int(r["label"]) for k, r in train.items()} == {
      "001.Albatross/a1.jpg": 0, "001.Albatross/a2.jpg": 0,
      "002.Auklet/b1.jpg": 1, "002.Auklet/gray.jpg": 1}
  assert {int(r["label"]) for r in test.values()} == {100, 199}
  assert int(train["002.Auklet/b1.jpg"]["image_id"]) == 3
  image = train["002.Auklet/b1.jpg"]["image"]
  assert image.shape == (10, 12, 3) and image.dtype == np.uint8
  np.testing.assert_allclose(image.mean((0, 1)), GREEN, atol=4)
  assert train["002.Auklet/gray.jpg"]["image"].shape == (10, 12, 3)
  np.testing.assert_allclose(test["101.Wren/pal.jpg"]["image"], np.broadcast_to(
      BLUE, (7, 5, 3)), atol=2)


def test_cub_count_check_and_metadata(cub):
  report, data_dir = cub
  assert len(report["warnings"]) == 2
  assert "train has 4 examples" in report["warnings"][0]
  assert "5,864" in report["warnings"][0]
  info = data_prep.load_info("cub", data_dir=data_dir)
  assert info.splits["test"].num_examples == 3
  assert info.metadata["num_classes"] == {"train": 2, "test": 2}
  assert info.metadata["bad_images"] == []
  # Readers need not import data_prep: the files describe themselves.
  ds = tfds.builder_from_directory(report["data_dir"]).as_data_source("train")
  assert len(ds) == 4


def test_check_counts_and_expect_flag():
  counts = {"train_sketches": 3, "test_sketches": 2, "train": 5}
  assert base.check_counts(counts, {"train_sketches+test_sketches": 5}) == []
  (w,) = base.check_counts(counts, {"train": 6})
  assert "train has 5 examples; the published number is 6 (-1)" in w
  assert build.parse_expected("none", {"train": 1}) == {}
  assert build.parse_expected("train=4,a+b=2", {}) == {"train": 4, "a+b": 2}
  with pytest.raises(ValueError, match="expect_counts"):
    build.parse_expected("train:4", {})


def test_missing_annotation_file_is_named(tmp_path):
  _cub_tree(tmp_path / "manual")
  os.remove(tmp_path / "manual/CUB_200_2011/image_class_labels.txt")
  with pytest.raises(base.MissingFileError,
                     match=r"(?s)image_class_labels\.txt.*Expected layout"):
    _build(tmp_path, "cub", tmp_path / "manual")
  with pytest.raises(base.MissingFileError, match="does not exist.*\n.*CUB_200_2011"):
    _build(tmp_path, "cub", tmp_path / "nowhere")
  with pytest.raises(base.MissingFileError, match=r"Ebay_train\.txt"):
    _build(tmp_path, "sop", tmp_path / "manual")


def test_corrupt_image_fails_or_is_skipped(tmp_path):
  _cub_tree(tmp_path / "manual")
  images = tmp_path / "manual/CUB_200_2011/images"
  # A JPEG cut in half (the header parses; only a full decode fails) and a
  # file that is no image at all.
  truncated, garbage = images / "101.Wren/c1.jpg", images / "001.Albatross/a2.jpg"
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
  garbage.write_text("not an image")
  with pytest.raises(base.BadImageError, match=r"001\.Albatross/a2\.jpg.*--skip_bad_images"):
    _build(tmp_path, "cub", tmp_path / "manual")
  garbage.unlink()
  with pytest.raises(base.BadImageError, match=r"Cannot read image .*a2\.jpg"):
    _build(tmp_path, "cub", tmp_path / "manual")
  _img(str(garbage))
  with pytest.raises(base.BadImageError, match=r"101\.Wren/c1\.jpg.*truncated"):
    _build(tmp_path, "cub", tmp_path / "manual")
  garbage.write_text("not an image")
  report, data_dir = _build(tmp_path, "cub", tmp_path / "manual",
                            skip_bad_images=True, expect_counts="train=3,test=2")
  assert report["counts"] == {"train": 3, "test": 2} and report["warnings"] == []
  assert sorted(report["bad_images"]) == sorted([str(truncated), str(garbage)])
  info = data_prep.load_info("cub", data_dir=data_dir)
  assert sorted(info.metadata["bad_images"]) == sorted(report["bad_images"])


def test_empty_split_is_reported(tmp_path):
  items = _cub_tree(tmp_path / "manual")
  top = tmp_path / "manual/CUB_200_2011"
  _write(str(top / "image_class_labels.txt"),
         "".join(f"{i} 1\n" for i in range(1, len(items) + 1)))
  with pytest.raises(ValueError, match=r"no examples for split\(s\) \['test'\]"):
    _build(tmp_path, "cub", tmp_path / "manual")


def test_cli_reports_missing_dir(tmp_path, capsys):
  flags.FLAGS(["build", "--manual_dir", str(tmp_path / "none"),
               "--data_dir", str(tmp_path / "d")])
  try:
    with pytest.raises(SystemExit) as e:
      build.main(["build", "cub"])
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code == 1
  assert "ERROR: --manual_dir" in capsys.readouterr().err


def test_load_info_unprepared_names_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m jaxdml.data_prep.build sop"):
    data_prep.load_info("sop", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown data set"):
    data_prep.builder_class("imagenet")
  assert data_prep.builder_class("jaxdml_cub") is data_prep.BUILDERS["cub"]
  assert set(data_prep.TFDS_NAMES.values()) == {
      "jaxdml_sketchy", "jaxdml_cub", "jaxdml_cars196", "jaxdml_sop",
      "jaxdml_inshop", "jaxdml_deepfashion2"}


# ----------------------------------------------------------------- Cars196
def test_cars196_splits_by_class_not_official_flag(tmp_path):
  root = tmp_path / "manual"
  rows = [(1, 0), (1, 1), (98, 1), (99, 0), (196, 1)]  # (class, official test)
  annos = np.zeros((1, len(rows)), dtype=[(f, "O") for f in (
      "relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")])
  for i, (c, t) in enumerate(rows):
    rel = f"car_ims/{i + 1:06d}.jpg"
    _img(str(root / rel), GREEN if c <= 98 else BLUE)
    annos[0, i] = (rel, np.uint8(1), np.uint8(2), np.uint8(10 + i), np.uint8(9),
                   np.uint8(c), np.uint8(t))
  scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annos})
  report, data_dir = _build(tmp_path, "cars196", root)
  assert report["counts"] == {"train": 3, "test": 2}
  train = _by(_read("cars196", "train", data_dir), "file_name")
  test = _by(_read("cars196", "test", data_dir), "file_name")
  assert sorted(int(r["label"]) for r in train.values()) == [0, 0, 97]
  assert sorted(int(r["label"]) for r in test.values()) == [98, 195]
  second = train["car_ims/000002.jpg"]
  assert bool(second["official_test"]) is True
  np.testing.assert_array_equal(second["bbox"], [1, 2, 11, 9])
  np.testing.assert_allclose(test["car_ims/000004.jpg"]["image"].mean((0, 1)),
                             BLUE, atol=4)


# ----------------------------------------------------------------- SOP
def test_sop_lists_and_folder_as_manual_dir(tmp_path):
  top = tmp_path / "manual/Stanford_Online_Products"
  header = "image_id class_id super_class_id path\n"
  train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
           (3, 2, 2, "cabinet_final/222_0.JPG")]
  test = [(4, 3, 1, "bicycle_final/333_0.JPG"), (5, 4, 12, "toaster_final/444_0.JPG")]
  for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
    _write(str(top / name), header + "".join(" ".join(map(str, r)) + "\n" for r in rows))
    for r in rows:
      _img(str(top / r[3]))
  # --manual_dir may be the unpacked folder itself.
  report, data_dir = _build(tmp_path, "sop", top, expect_counts="none")
  assert report["counts"] == {"train": 3, "test": 2} and report["warnings"] == []
  got = _by(_read("sop", "train", data_dir) + _read("sop", "test", data_dir), "file_name")
  assert {k: (int(r["label"]), int(r["super_class"]), int(r["image_id"]))
          for k, r in got.items()} == {
              r[3]: (r[1] - 1, r[2] - 1, r[0]) for r in train + test}


# ----------------------------------------------------------------- In-Shop
def test_inshop_train_query_gallery(tmp_path):
  root = tmp_path / "manual"
  rows = [("img/WOMEN/Dresses/id_00000002/01_1_front.jpg", "id_00000002", "train"),
          ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
          ("img/MEN/Denim/id_00000009/01_1_front.jpg", "id_00000009", "train"),
          ("img/WOMEN/Tees/id_00000001/01_1_front.jpg", "id_00000001", "query"),
          ("img/WOMEN/Tees/id_00000001/01_2_side.jpg", "id_00000001", "gallery"),
          ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
          ("img/MEN/Denim/id_00000080/01_3_back.jpg", "id_00000080", "gallery"),
          ("img/MEN/Denim/id_00000080/01_4_full.jpg", "id_00000080", "gallery")]
  # The official file pads its columns with spaces.
  _write(str(root / "Eval/list_eval_partition.txt"),
         f"{len(rows)}\nimage_name item_id evaluation_status\n"
         + "".join(f"{n:<60}{i} {s}\n" for n, i, s in rows))
  for name, _, _ in rows:
    _img(str(root / name))
  report, data_dir = _build(tmp_path, "inshop", root)
  assert report["counts"] == {"train": 3, "query": 2, "gallery": 3}
  assert len(report["warnings"]) == 3
  split = {s: _read("inshop", s, data_dir) for s in ("train", "query", "gallery")}
  item_label = {}
  for s, exs in split.items():
    for ex in exs:
      assert ex["evaluation_status"].decode() == s
      assert item_label.setdefault(ex["item_id"].decode(), int(ex["label"])) == int(ex["label"])
  # Train items are numbered first (sorted), then test items (sorted).
  assert item_label == {"id_00000002": 0, "id_00000009": 1,
                        "id_00000001": 2, "id_00000080": 3}


def test_inshop_truncated_partition_is_reported(tmp_path):
  path = tmp_path / "list_eval_partition.txt"
  _write(str(path), "3\nimage_name item_id evaluation_status\nimg/a.jpg id_1 train\n")
  with pytest.raises(ValueError, match="announces 3 images but 1"):
    inshop.read_partition(str(path))


# ----------------------------------------------------------------- Sketchy
def test_sketchy_photo_ids_link_sketches_to_photos(tmp_path):
  root = tmp_path / "manual"
  top = root / "rendered_256x256/256x256"
  photos = {"airplane": ["n1_10", "n1_20", "n1_30"], "car_(sedan)": ["n2_5", "n2_7"]}
  n_sketches = {"n1_10": 2, "n1_20": 1, "n1_30": 3, "n2_5": 2, "n2_7": 1}
  for cat, names in photos.items():
    for name in names:
      _img(str(top / "photo/tx_000000000000" / cat / f"{name}.jpg"), RED, (16, 16))
      for n in range(1, n_sketches[name] + 1):
        _img(str(top / "sketch/tx_000000000000" / cat / f"{name}-{n}.png"),
             (255, 255, 255), (16, 16))
  _write(str(root / "info/testset.txt"), "airplane/n1_30.jpg\ncar_(sedan)/n2_5.jpg\n")
  report, data_dir = _build(tmp_path, "sketchy", root)
  assert report["counts"] == {"train_photos": 3, "train_sketches": 4,
                              "test_photos": 2, "test_sketches": 5}
  assert any("train_sketches+test_sketches has 9" in w for w in report["warnings"])
  d = {s: _read("sketchy", s, data_dir) for s in sketchy.SPLITS}
  photo = {(ex["category_name"].decode(), ex["photo_name"].decode()): ex
           for s in ("train_photos", "test_photos") for ex in d[s]}
  # Train photos take ids 0..2, test photos 3..4, each sorted by (category, name).
  assert {k: int(v["photo_id"]) for k, v in photo.items()} == {
      ("airplane", "n1_10"): 0, ("airplane", "n1_20"): 1, ("car_(sedan)", "n2_7"): 2,
      ("airplane", "n1_30"): 3, ("car_(sedan)", "n2_5"): 4}
  for ex in d["train_photos"] + d["test_photos"]:
    assert int(ex["label"]) == int(ex["photo_id"]) and int(ex["sketch_index"]) == 0
  for split, photo_split in (("train_sketches", "train_photos"),
                             ("test_sketches", "test_photos")):
    ids = {int(ex["photo_id"]) for ex in d[photo_split]}
    for ex in d[split]:
      p = photo[ex["category_name"].decode(), ex["photo_name"].decode()]
      assert int(ex["photo_id"]) == int(p["photo_id"]) == int(ex["label"])
      assert int(ex["photo_id"]) in ids
      assert int(ex["category"]) == int(p["category"])
      assert int(ex["sketch_index"]) >= 1
      np.testing.assert_array_equal(ex["image"], 255)
  assert sorted(int(ex["sketch_index"]) for ex in d["test_sketches"]
                if ex["photo_name"] == b"n1_30") == [1, 2, 3]
  assert {int(ex["category"]) for ex in d["test_photos"]} == {0, 1}


# ----------------------------------------------------------------- DeepFashion2
def _df2_tree(root):
  def item(style, box, cat=1):
    return {"style": style, "bounding_box": box, "category_id": cat,
            "category_name": "short sleeve top", "landmarks": [], "segmentation": []}
  annos = {
      "train": {"000001": ("user", 1, [item(1, [1, 1, 9, 7]), item(0, [0, 0, 5, 5])]),
                "000002": ("shop", 1, [item(1, [2, 2, 8, 8])]),
                "000003": ("user", 2, [item(1, [0, 0, 4, 4]), item(2, [3, 1, 10, 6])])},
      "validation": {"000001": ("user", 1, [item(1, [1, 2, 7, 9]), item(0, [0, 0, 3, 3])]),
                     "000002": ("user", 2, [item(1, [0, 0, 6, 6])]),
                     "000003": ("shop", 1, [item(1, [2, 3, 12, 10]), item(0, [0, 0, 2, 2])]),
                     "000004": ("shop", 2, [item(1, [0, 0, 5, 5])])}}
  for part, files in annos.items():
    for stem, (source, pair_id, items) in files.items():
      anno = {"source": source, "pair_id": pair_id}
      anno.update({f"item{k}": it for k, it in enumerate(items, 1)})
      _write(str(root / part / "annos" / f"{stem}.json"), json.dumps(anno))
      _img(str(root / part / "image" / f"{stem}.jpg"), GREEN, (14, 12))


def test_deepfashion2_pairs_and_crop(tmp_path):
  _df2_tree(tmp_path / "manual")
  report, data_dir = _build(tmp_path, "deepfashion2", tmp_path / "manual")
  assert report["counts"] == {"train": 4, "query": 2, "gallery": 3}
  d = {s: _by(_read("deepfashion2", s, data_dir), "file_name")
       for s in ("train", "query", "gallery")}
  tr, q, g = d["train"], d["query"], d["gallery"]
  assert "train/000001/item2" not in tr  # style 0 never trains
  lab = lambda s, k: int(s[k]["label"])
  assert lab(tr, "train/000001/item1") == lab(tr, "train/000002/item1")
  assert len({lab(tr, k) for k in tr}) == 3  # (1,1), (2,1), (2,2)
  assert {q[k]["source"] for k in q} == {b"user"}
  assert {g[k]["source"] for k in g} == {b"shop"}
  assert lab(q, "validation/000001/item1") == lab(g, "validation/000003/item1")
  assert lab(q, "validation/000002/item1") == lab(g, "validation/000004/item1")
  distractor = lab(g, "validation/000003/item2")
  assert int(g["validation/000003/item2"]["style"]) == 0
  assert distractor not in {lab(s, k) for s in (tr, q) for k in s}
  assert not {lab(tr, k) for k in tr} & {lab(q, k) for k in q}
  np.testing.assert_array_equal(g["validation/000003/item1"]["bbox"], [2, 3, 12, 10])
  assert g["validation/000003/item1"]["image"].shape == (12, 14, 3)
  builder = data_prep.BUILDERS["deepfashion2"](
      data_dir=data_dir, config="crop", file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / "manual"), try_download_gcs=False))
  crops = _by([*builder.as_data_source("gallery")], "file_name")
  assert crops["validation/000003/item1"]["image"].shape == (7, 10, 3)
  assert crops["validation/000003/item2"]["image"].shape == (2, 2, 3)


def test_max_side_stores_a_smaller_copy_and_a_rebuild_must_agree(tmp_path):
  """`--max_side=N`: the longer side of every stored image is at most N
  (aspect kept, small images untouched); reusing the data dir with another
  N is refused, naming --overwrite."""
  top = tmp_path / "manual" / "CUB_200_2011"
  _img(str(top / "images/001.A/big.jpg"), RED, size=(90, 60))
  _img(str(top / "images/101.B/small.jpg"), BLUE, size=(20, 30))
  _write(str(top / "images.txt"), "1 001.A/big.jpg\n2 101.B/small.jpg\n")
  _write(str(top / "image_class_labels.txt"), "1 1\n2 101\n")
  _build(tmp_path, "cub", tmp_path / "manual", expect_counts="none", max_side=45)
  data_dir = str(tmp_path / "data")
  (train,), (test,) = _read("cub", "train", data_dir), _read("cub", "test", data_dir)
  assert train["image"].shape == (30, 45, 3)
  assert test["image"].shape == (30, 20, 3)
  np.testing.assert_allclose(train["image"].mean((0, 1)), RED, atol=3)
  with pytest.raises(ValueError, match="max_side=45, not 60.*--overwrite"):
    _build(tmp_path, "cub", tmp_path / "manual", expect_counts="none", max_side=60)
