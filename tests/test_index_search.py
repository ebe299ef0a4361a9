"""`jaxdml.index` and `jaxdml.search` end to end on the embedded data.

The SBIR smoke run's test photos and sketches are written to a folder as
JPEG and PNG files of several sizes, indexed with the run's checkpoint and
searched. As in test_export.py the checkpoint is random (`save_random_checkpoint`),
not trained: the same restore path, without compiling a train step. The
reference embeddings are `model.apply` on the saved variables.
"""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxdml import build, checkpoint, data as data_lib, train
from jaxdml import workdir as workdir_lib
from jaxdml.apps import embedder, image_index
from jaxdml.data import augment
from jaxdml.retrieval import picture
from test_export import STEP, apply, random_value, save_random_checkpoint
from test_train import ROOT, load_config, evaluation

SIZE = 32  # the smoke config's image size
TOL = 1e-4
# (relative path, format, size): JPEG and PNG, larger and non-square, nested.
LAYOUT = [("a/photo_0.jpg", "JPEG", (48, 40)), ("a/photo_1.JPEG", "JPEG", (32, 32)),
          ("photo_2.png", "PNG", (70, 64)), ("b/c/photo_3.PNG", "PNG", (32, 32)),
          ("photo_4.png", "PNG", (40, 56)), ("photo_5.jpg", "JPEG", (64, 64))]


def run_cli(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A smoke SBIR workdir with config.json, its variables, and a folder of
  its test photos (LAYOUT, plus a text file the index must skip)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config("sketchy_rtl.py")
  model, variables = save_random_checkpoint(config, workdir)
  workdir_lib.save_config(config, workdir)
  sets = data_lib.eval_sets(config.data, task=config.task)
  folder = tmp_path_factory.mktemp("images")
  for (name, fmt, size), photo in zip(LAYOUT, sets["gallery"]["images"]):
    os.makedirs(folder / os.path.dirname(name), exist_ok=True)
    Image.fromarray(photo).resize(size, Image.BILINEAR).save(folder / name, format=fmt)
  (folder / "notes.txt").write_text("not an image")
  return dict(workdir=workdir, config=config, model=model, variables=variables,
              folder=str(folder), sketches=sets["query"]["images"])


@pytest.fixture(scope="module")
def index(run, tmp_path_factory):
  """The index `python -m jaxdml.apps.index_images` writes (8 devices, batches of 4)."""
  out = str(tmp_path_factory.mktemp("out") / "photos.index")
  result = run_cli("jaxdml.apps.index_images", f"--workdir={run['workdir']}", f"--images={run['folder']}",
                   f"--out={out}", "--batch_size=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Indexed {len(LAYOUT)} images" in result.stdout
  return image_index.load_index(out)


@pytest.fixture(scope="module")
def model(run):
  return embedder.from_workdir(run["workdir"], batch_size=8)


def files_in_order():
  return sorted(name for name, _, _ in LAYOUT)


def test_index_holds_the_models_embeddings_of_each_file(run, index):
  assert index.files == files_in_order()
  assert index.folder == run["folder"]
  # The pixels: evaluation's transform of the decoded file.
  pixels = np.stack([augment.eval_transform(
      np.asarray(Image.open(os.path.join(run["folder"], f)).convert("RGB")), size=SIZE)
                     for f in index.files])
  want = apply(run["model"], run["variables"], pixels, "embed_gallery")
  assert index.embeddings.dtype == np.float32 and index.embeddings.shape == (len(LAYOUT), 16)
  np.testing.assert_allclose(index.embeddings, want, atol=TOL, rtol=TOL)
  manifest = index.manifest
  assert manifest["model"] == {"workdir": run["workdir"], "step": STEP}
  assert (manifest["count"], manifest["dim"], manifest["tower"]) == (len(LAYOUT), 16, "gallery")
  assert (manifest["backend"], manifest["similarity"]) == ("exact", "cosine")
  assert np.asarray(manifest["probe"]).shape == (image_index.PROBE_ROWS, 16)
  assert not os.path.exists(index.path + ".tmp-" + str(os.getpid()))


def test_indexed_files_find_themselves_first(index, model, run):
  rows = [0, 3, 5]
  images = embedder.load_images([index.path_of(r) for r in rows], SIZE)
  scores, found = image_index.search_index(index, model, images, k=3, tower="gallery")
  assert found[:, 0].tolist() == rows
  np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
  # Sketches go through the query tower: another encoder, other scores.
  scores, found = image_index.search_index(index, model, run["sketches"][:2], k=len(LAYOUT))
  assert found.shape == (2, len(LAYOUT)) and np.all(scores < 0.9999)


def test_cli_search_prints_neighbours_and_draws_them(index, tmp_path):
  queries = [index.path_of(1), index.path_of(4)]
  out = tmp_path / "neighbours.png"
  result = run_cli("jaxdml.apps.search_images", f"--index={index.path}", *queries, "-k", "3",
                   f"--picture={out}", "--tower=gallery")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for query, row in zip(queries, (1, 4)):
    first = lines[lines.index(query) + 1].split()
    assert first[0] == "1" and first[2] == index.files[row]
    assert abs(float(first[1]) - 1.0) < 1e-3
  assert Image.open(out).size == picture.grid_size(2, 3, 96)
  # Every result gets the neutral frame: nothing says what a hit is here.
  frame = np.asarray(Image.open(out).convert("RGB"))[picture.GAP, -picture.GAP - 50]
  assert tuple(frame) == picture.NEUTRAL


def test_cli_search_json(index, run):
  result = run_cli("jaxdml.apps.search_images", f"--index={index.path}", "--json", "--k=2", "--tower=gallery",
                   index.path_of(2))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["model"] == f"workdir {run['workdir']} (step {STEP})"
  assert [n["file"] for n in out["results"][0]["neighbours"]][0] == index.files[2]
  assert out["results"][0]["neighbours"][0]["path"] == index.path_of(2)


def test_another_model_is_refused(index, run, tmp_path):
  config = load_config("sketchy_rtl.py")
  other = str(tmp_path / "other")
  save_other_checkpoint(config, other, seed=1)
  with pytest.raises(image_index.ModelMismatchError,
                     match=rf"workdir {other} \(step {STEP}\), is not the model index .*"
                           rf"{run['workdir']} \(step {STEP}\).*Rebuild the index"):
    image_index.search_index(index, embedder.from_workdir(other, config), run["sketches"][:1])
  narrow = fake_model(dim=8)
  with pytest.raises(image_index.ModelMismatchError, match="makes 8-d embeddings.*16-d"):
    image_index.check_model(index, narrow)


def test_scann_index_round_trips(index, model, run, tmp_path):
  pytest.importorskip("scann")
  out = tmp_path / "scann.index"
  built = image_index.build_index(model, run["folder"], str(out), backend="scann",
                                  progress=False)
  assert (out / "scann").is_dir() and built.manifest["scann_config"]["brute_force"]
  loaded = image_index.load_index(str(out))
  assert loaded.index.backend == "scann"
  np.testing.assert_allclose(loaded.embeddings, index.embeddings, atol=TOL)
  queries = index.embeddings[[1, 2]] + 0.01
  scores, rows = image_index.search_embeddings(loaded, queries, k=4)
  want_scores, want_rows = image_index.search_embeddings(index, queries, k=4)
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_allclose(scores, want_scores, atol=1e-4)


def test_export_gives_the_same_neighbours(index, run):
  from jaxdml.apps import export  # pylint: disable=g-import-not-at-top
  path = export.export_saved_model(run["config"], run["workdir"])
  exported = embedder.from_export(path)
  image_index.check_model(index, exported)  # the same run: accepted
  images = embedder.load_images([index.path_of(r) for r in range(3)], SIZE)
  np.testing.assert_allclose(exported.embed("gallery", images), index.embeddings[:3],
                             atol=TOL, rtol=TOL)
  queries = run["sketches"][:3]
  want = image_index.search_index(index, embedder.from_workdir(run["workdir"]), queries, k=4)
  got = image_index.search_index(index, exported, queries, k=4)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)


def test_an_image_index_is_an_index_whose_files_are_checked(index, run, tmp_path):
  """It loads as a `retrieval.Index`; a files list of another index, one of
  another length, an old format and a bare `Index` are refused in one line."""
  from jaxdml.retrieval import Index  # pylint: disable=g-import-not-at-top
  as_index = Index.load(index.path)
  assert (as_index.count, as_index.similarity) == (len(LAYOUT), "cosine")
  np.testing.assert_array_equal(as_index.embeddings, index.embeddings)
  fewer = tmp_path / "fewer"
  fewer.mkdir()
  for name in files_in_order()[:4]:
    shutil.copy(os.path.join(run["folder"], name), fewer / os.path.basename(name))
  other = tmp_path / "other.index"
  image_index.build_index(fake_model(dim=16), str(fewer), str(other), progress=False)

  def damaged(change):
    copy = tmp_path / "damaged"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(index.path, copy)
    change(copy)
    with pytest.raises(ValueError) as caught:
      image_index.load_index(str(copy))
    message = str(caught.value)
    assert "\n" not in message and "python -m jaxdml.apps.index_images" in message
    return message

  assert re.search(r"files.json (is not the file|has \d+ bytes)", damaged(
      lambda copy: shutil.copy(other / "files.json", copy / "files.json")))

  def shorter_list_in_the_manifest(copy):
    listing = json.loads((copy / "files.json").read_text())
    listing["files"] = listing["files"][:5]
    (copy / "files.json").write_text(json.dumps(listing))
    manifest = json.loads((copy / "manifest.json").read_text())
    digest = hashlib.sha256((copy / "files.json").read_bytes()).hexdigest()
    manifest["files"]["files.json"] = {"size": (copy / "files.json").stat().st_size,
                                       "sha256": digest}
    (copy / "manifest.json").write_text(json.dumps(manifest))
  assert "files.json lists 5 files for 6 embeddings" in damaged(shorter_list_in_the_manifest)

  def format_1(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
  assert "an index of format 1; this jaxdml reads format 2: rebuild it" in damaged(format_1)

  bare = tmp_path / "bare"
  as_index.save(bare)
  with pytest.raises(ValueError, match="is an index of embeddings, not of images"):
    image_index.load_index(str(bare))


def test_an_interrupted_build_keeps_the_index_there_was(run, tmp_path, monkeypatch):
  out = str(tmp_path / "photos.index")
  image_index.build_index(fake_model(dim=8), run["folder"], out, progress=False)
  real_rename = os.rename

  def killed_at_the_swap(source, target):
    if ".tmp-" in source:  # the new index, complete, about to take its place
      raise KeyboardInterrupt
    real_rename(source, target)
  monkeypatch.setattr(os, "rename", killed_at_the_swap)
  with pytest.raises(KeyboardInterrupt):
    image_index.build_index(fake_model(dim=4), run["folder"], out, progress=False)
  monkeypatch.undo()
  assert image_index.load_index(out).manifest["dim"] == 8
  assert os.listdir(tmp_path) == ["photos.index"]  # no half index beside it
  with pytest.raises(FileNotFoundError, match="not an index, or its build was interrupted"):
    image_index.load_index(str(tmp_path / "never_built"))


def test_a_folder_that_is_not_an_index_is_never_replaced(run):
  with pytest.raises(FileExistsError, match="is not an index"):
    image_index.build_index(fake_model(), run["folder"], run["folder"], progress=False)


def test_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no image files"):
    image_index.list_images(tmp_path)
  with pytest.raises(FileNotFoundError, match="--config=configs/NAME.py"):
    workdir_lib.load_config(str(tmp_path))


def test_picture_without_labels_has_neutral_frames(tmp_path):
  rng = np.random.default_rng(0)
  queries = rng.integers(0, 256, (2, 20, 20, 3), np.uint8)
  gallery = rng.integers(0, 256, (5, 30, 30, 3), np.uint8)
  path = picture.save_retrieval_grid(tmp_path / "g.png", queries, gallery,
                                     np.array([[0, 1], [2, 3]]), None, tile=32)
  img = np.asarray(Image.open(path).convert("RGB"))
  for r in range(2):
    for c in range(2):
      x = picture.GAP + (c + 1) * (32 + picture.GAP) + picture.QUERY_GAP
      y = picture.GAP + r * (32 + picture.GAP)
      assert np.all(img[y, x:x + 32] == picture.NEUTRAL)


def save_other_checkpoint(config, workdir, seed):
  """`save_random_checkpoint` with other values: another model of the same
  shapes, as another seed or checkpoint would be."""
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map_with_path(lambda p, x: random_value(p, x, rng),
                                           build.build(config).abstract)
  state["step"] = np.asarray(STEP, np.int32)
  ckpt = checkpoint.Checkpointer(workdir, model_config=config.model, async_save=False)
  ckpt.save(STEP, state)
  ckpt.close()
  workdir_lib.save_config(config, workdir)


def fake_model(dim=8, embed=None):
  """An Embedder without a network, for checks that need none."""
  embed = embed or (lambda tower, images: np.ones((len(images), dim), np.float32))
  config = ml_collections.ConfigDict({"data": {"num_threads": 2}})
  return embedder.Embedder(source={"workdir": "/nowhere", "step": 0}, config=config,
                           image_size=SIZE, embed_fn=embed)


def test_training_writes_its_config_for_the_tools(tmp_path):
  config = load_config("sketchy_rtl.py")
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path), stop_after=0)  # set-up only, no step
  saved = workdir_lib.load_config(str(tmp_path))
  assert json.loads(saved.to_json()) == json.loads(config.to_json())  # tuples come back as lists


def _images_that_do_not_load(folder) -> dict:
  """A fake .png, a JPEG cut short and a 1.5-megapixel PNG (over
  --max_megapixels=1): {file: what its error says}."""
  (folder / "fake.png").write_bytes(b"not a png at all")
  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      jpeg, format="JPEG")
  (folder / "cut.jpg").write_bytes(jpeg.getvalue()[:400])
  Image.new("L", (1500, 1000)).save(folder / "large.png")
  return {"fake.png": "not an image file", "cut.jpg": "Truncated",
          "large.png": "has 2 megapixels, over the limit of 1"}


def test_index_leaves_out_files_that_do_not_load_and_strict_refuses(run, index, tmp_path):
  folder = tmp_path / "mixed"
  shutil.copytree(run["folder"], folder)
  bad = _images_that_do_not_load(folder)
  out = tmp_path / "mixed.index"
  args = [f"--workdir={run['workdir']}", f"--images={folder}", "--max_megapixels=1"]
  result = run_cli("jaxdml.apps.index_images", *args, f"--out={out}")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert f"Indexed {len(LAYOUT)} images" in result.stdout
  assert f"Left out {len(bad)} files that do not load" in result.stdout
  for name, why in bad.items():
    [line] = [l for l in result.stdout.splitlines() if str(folder / name) in l]
    assert why in line, line
  mixed = image_index.load_index(str(out))
  assert mixed.files == index.files and sorted(mixed.manifest["skipped"]) == sorted(bad)
  np.testing.assert_allclose(mixed.embeddings, index.embeddings, atol=TOL)

  strict = run_cli("jaxdml.apps.index_images", *args, f"--out={tmp_path / 'strict.index'}",
                   "--strict")
  said = [l for l in strict.stderr.splitlines() if l.startswith("jaxdml:")]
  assert strict.returncode == 1 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
  assert len(said) == 1 and all(str(folder / name) in said[0] for name in bad), said
  assert not (tmp_path / "strict.index").exists()


def test_search_names_queries_that_do_not_load_and_answers_the_others(index, tmp_path):
  bad = _images_that_do_not_load(tmp_path)
  queries = [index.path_of(1), *(str(tmp_path / name) for name in bad),
             str(tmp_path / "missing.png"), index.path_of(4)]
  result = run_cli("jaxdml.apps.search_images", f"--index={index.path}", *queries, "-k", "2",
                   "--tower=gallery", "--max_megapixels=1")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for query, row in ((queries[0], 1), (queries[-1], 4)):
    assert lines[lines.index(query) + 1].split()[2] == index.files[row]
  said = [l for l in result.stderr.splitlines() if l.startswith("jaxdml:")]
  assert len(said) == len(bad) + 1
  for name, why in [*bad.items(), ("missing.png", "No such file")]:
    [line] = [l for l in said if str(tmp_path / name) in l]
    assert why in line, line


def test_an_image_over_pils_pixel_limit_is_named(tmp_path):
  """PIL's own guard (179 megapixels) as the default: a 400-megapixel PNG,
  390 KB on disk, is refused by name before it is decoded."""
  Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png")
  with pytest.raises(ValueError, match=r"bomb.png has 400 megapixels, over the limit of 179: "
                     r"resize it, or raise the limit with --max_megapixels"):
    embedder.load_image(tmp_path / "bomb.png", SIZE)
