r"""The input pipeline on real JPEG files: jaxdml per recipe beside tf.data and torchvision.

  python benchmarks/input_pipeline.py --root=/tmp/jpegs            # make, build, time
  python benchmarks/input_pipeline.py --root=/tmp/jpegs --pipelines=tfdata,torchvision

Makes a CUB-layout tree of realistic JPEGs (500x375 and 375x500, quality 90,
~50 KB: smooth multi-scale colour fields with fine grain, so the encoder has
real work), prepares it with `data_prep.build cub`, and prints one JSON line
per pipeline with images/s and CPU seconds per image (jaxdml's include its
worker processes'). `sop_*` recipes read the same kind of files in SOP's
layout (`make_sop_tree`); `sketchy_*` recipes a Sketchy tree of 256 px JPEG
photos and 256 px PNG line-drawing sketches (`make_sketchy_tree`). The
anchors read the CUB files:
- `tfdata`: big_vision's path, `decode_and_crop_jpeg` with an inception
  crop (scale 0.2-1), resize to 224, flip, batched, autotuned;
- `torchvision`: a DataLoader with PIL decode, RandomResizedCrop(224,
  scale 0.2-1) and a flip, `--workers` processes (skipped without
  torchvision; it is not a jaxdml dependency);
- `tfdata_sketchy`: the Sketchy files as `sketchy_rtl`'s pairs: a photo
  (`decode_and_crop_jpeg`) and one of its sketches (`decode_png`, crop),
  each an inception crop resized to 224, one flip for the pair.
jaxdml is `python -m jaxdml.bench --config=configs/RECIPE --measure=input
--config.data.data_dir=ROOT/data` (`--recipes`), run as a subprocess.
All files are read once before timing, so they are in the page cache.
"""
import glob
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

from jaxdml import host

_ROOT = flags.DEFINE_string("root", "/tmp/jaxdml_jpegs", "Folder for the tree and the prepared data.")
_NUM = flags.DEFINE_integer("num_images", 400, "JPEG files to make (half per split).")
_PIPELINES = flags.DEFINE_list("pipelines", ["jaxdml", "tfdata", "torchvision"],
                               "What to time: jaxdml, tfdata, torchvision, tfdata_sketchy.")
_RECIPES = flags.DEFINE_list("recipes", ["cub_obdsd.py", "cub_irt.py", "cub_proxy_anchor.py",
                                         "cub_raml.py", "sop_xbn.py"],
                             "jaxdml recipes to time (CUB data; sop_*: the same kind of files "
                             "in SOP's layout, `make_sop_tree`; sketchy_*: `make_sketchy_tree`).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed batches.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "torchvision DataLoader worker processes.")
_LAYOUTS = flags.DEFINE_list(
    "jaxdml_layouts", ["0x1", "0x2", "2x1"],
    "jaxdml layouts to time, WORKERSxTHREADS: data.num_workers worker processes (0: none) of "
    "data.num_threads threads each; 'default' leaves both to the host's core count.")
_TFDATA_THREADS = flags.DEFINE_list("tfdata_threads", ["0"],
                                    "tf.data threads to time (0: autotuned map and pool).")


def realistic_jpeg(rng, height, width) -> bytes:
  """A JPEG (quality 90) with the spectrum of a photo: colour fields at several
  scales plus fine grain, ~40-60 KB at 500x375."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  image = np.zeros((height, width, 3), np.float32)
  for cells, amplitude in ((3, 70.0), (12, 35.0), (48, 18.0)):
    small = rng.normal(size=(cells, cells * width // height + 1, 3)).astype(np.float32)
    for c in range(3):
      layer = Image.fromarray(small[..., c]).resize((width, height), Image.BICUBIC)
      image[..., c] += amplitude * np.asarray(layer)
  image += 128 + rng.normal(0, 5.0, image.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  return out.getvalue()


def make_cub_tree(root: str, num_images: int, seed: int = 0) -> str:
  """`root/manual/CUB_200_2011` with `num_images` JPEGs over classes 1-200."""
  top = os.path.join(root, "manual", "CUB_200_2011")
  if os.path.exists(os.path.join(top, "images.txt")):
    return top
  rng = np.random.default_rng(seed)
  lines, labels = [], []
  for i in range(num_images):
    cls = 1 + (i % 100) + (100 if i % 2 else 0)  # both splits, 2+ images per class
    rel = f"{cls:03d}.Class{cls}/img_{i:05d}.jpg"
    path = os.path.join(top, "images", rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = (375, 500) if i % 3 else (500, 375)
    with open(path, "wb") as f:
      f.write(realistic_jpeg(rng, h, w))
    lines.append(f"{i + 1} {rel}\n")
    labels.append(f"{i + 1} {cls}\n")
  with open(os.path.join(top, "images.txt"), "w") as f:
    f.writelines(lines)
  with open(os.path.join(top, "image_class_labels.txt"), "w") as f:
    f.writelines(labels)
  return top


def make_sop_tree(root: str, num_images: int, seed: int = 1) -> str:
  """`root/manual/Stanford_Online_Products`: JPEGs made as `make_cub_tree`
  makes them, in SOP's layout, 4 images a product (sop_xbn's m_per_class).
  Real SOP photos vary more in size; this times sop_xbn's own pipeline
  (its sampler and crop) on files like CUB's."""
  top = os.path.join(root, "manual", "Stanford_Online_Products")
  if os.path.exists(os.path.join(top, "Ebay_test.txt")):
    return top
  rng = np.random.default_rng(seed)
  lists = {"train": [], "test": []}
  for i in range(num_images):
    split = "train" if i < num_images // 2 else "test"
    product = 1 + i // 4
    rel = f"bicycle_final/{product:06d}_{i % 4}.JPG"
    path = os.path.join(top, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = (375, 500) if i % 3 else (500, 375)
    with open(path, "wb") as f:
      f.write(realistic_jpeg(rng, h, w))
    lists[split].append(f"{i + 1} {product} 1 {rel}\n")
  for split, lines in lists.items():
    with open(os.path.join(top, f"Ebay_{split}.txt"), "w") as f:
      f.writelines(["image_id class_id super_class_id path\n"] + lines)
  return top


def sketch_png(rng, size: int = 256) -> bytes:
  """A line drawing as Sketchy's are: black strokes 1-3 px wide on white,
  an RGB PNG of ~4 KB."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  image = Image.new("RGB", (size, size), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(15, 40)):
    points = np.cumsum(rng.normal(0, 12, size=(rng.integers(3, 12), 2)), 0)
    points = (points + rng.uniform(40, size - 40, 2)).clip(0, size - 1)
    draw.line([tuple(p) for p in points], fill=(0, 0, 0), width=int(rng.integers(1, 4)))
  out = io.BytesIO()
  image.save(out, "PNG")
  return out.getvalue()


def make_sketchy_tree(root: str, num_photos: int, seed: int = 2,
                      sketches_per_photo: int = 5) -> str:
  """`root/manual/256x256` (+ `info/testset.txt`): Sketchy's layout with
  `num_photos` 256 px JPEG photos (`realistic_jpeg`) over 10 categories,
  each with `sketches_per_photo` PNG sketches; a tenth of the photos test."""
  top = os.path.join(root, "manual", "256x256")
  testset = os.path.join(root, "manual", "info", "testset.txt")
  if os.path.exists(testset):
    return top
  rng = np.random.default_rng(seed)
  test = []
  for i in range(num_photos):
    category, name = f"category{i % 10}", f"n{i:05d}"
    for kind in ("photo", "sketch"):
      os.makedirs(os.path.join(top, kind, "tx_000000000000", category), exist_ok=True)
    with open(os.path.join(top, "photo", "tx_000000000000", category, name + ".jpg"), "wb") as f:
      f.write(realistic_jpeg(rng, 256, 256))
    for n in range(1, sketches_per_photo + 1):
      with open(os.path.join(top, "sketch", "tx_000000000000", category, f"{name}-{n}.png"),
                "wb") as f:
        f.write(sketch_png(rng))
    if i % 10 == 0:
      test.append(f"{category}/{name}.jpg\n")
  os.makedirs(os.path.dirname(testset), exist_ok=True)
  with open(testset, "w") as f:
    f.writelines(test)
  return top


def prepare(root: str, dataset: str = "cub") -> str:
  data_dir = os.path.join(root, "data")
  if not glob.glob(os.path.join(data_dir, f"jaxdml_{dataset}", "*", "*")):
    from jaxdml.data_prep import build  # pylint: disable=g-import-not-at-top
    build.build(dataset, manual_dir=os.path.join(root, "manual"), data_dir=data_dir,
                expect_counts="none")
  return data_dir


def prepare_for(root: str, recipes, num_images: int) -> str:
  """The data folder with CUB prepared, and SOP or Sketchy where `recipes`
  (file names) need them, from trees of `num_images` files made first."""
  make_cub_tree(root, num_images)
  data_dir = prepare(root)
  if any(r.startswith("sop_") for r in recipes):
    make_sop_tree(root, num_images)
    prepare(root, "sop")
  if any(r.startswith("sketchy_") for r in recipes):
    make_sketchy_tree(root, num_images)
    prepare(root, "sketchy")
  return data_dir


def _cpu_seconds():
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _inception_box(tf, shape):
  """big_vision's inception crop in tf.data: `[top, left, height, width]`
  of a random box covering 20-100 % of an image of `shape`."""
  begin, size, _ = tf.image.sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), area_range=(0.2, 1.0),
      min_object_covered=0, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def time_tfdata(files, batch, steps, threads=0) -> dict:
  """`threads` 0: autotuned; n: n map calls in flight on a private pool of n
  threads (tf.data's per-core scaling beside jaxdml's)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(path):
    data = tf.io.read_file(path)
    box = _inception_box(tf, tf.io.extract_jpeg_shape(data))
    image = tf.image.decode_and_crop_jpeg(data, box, channels=3)
    image = tf.image.resize(image, (224, 224))
    image = tf.image.random_flip_left_right(image)
    return tf.cast(image, tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(files).repeat().shuffle(len(files))
  ds = ds.map(load, num_parallel_calls=threads or tf.data.AUTOTUNE).batch(batch).prefetch(2)
  if threads:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    ds = ds.with_options(options)
  it = iter(ds)
  next(it)
  name = "tf.data decode_and_crop_jpeg" + (f" x{threads}" if threads else "")
  return {**_timed(lambda: next(it), batch, steps, name), "threads": threads or "autotune"}


def time_tfdata_sketchy(top, batch, steps) -> dict:
  """`sketchy_rtl`'s pairs in tf.data, autotuned: the photo decoded over its
  inception crop, the sketch decoded whole and cropped, both resized to
  224, one flip for both. A batch of `batch` pairs is 2 * `batch` images."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  photos = sorted(glob.glob(os.path.join(top, "photo", "*", "*", "*.jpg")))
  sketches = [p.replace(os.sep + "photo" + os.sep, os.sep + "sketch" + os.sep)[:-4] + "-1.png"
              for p in photos]

  def load(photo_path, sketch_path):
    data = tf.io.read_file(photo_path)
    photo = tf.image.decode_and_crop_jpeg(data, _inception_box(tf, tf.io.extract_jpeg_shape(data)),
                                          channels=3)
    sketch = tf.io.decode_png(tf.io.read_file(sketch_path), channels=3)
    box = _inception_box(tf, tf.shape(sketch))
    sketch = tf.image.crop_to_bounding_box(sketch, box[0], box[1], box[2], box[3])
    flip = tf.random.uniform([]) < 0.5
    out = []
    for image in (photo, sketch):
      image = tf.cast(tf.image.resize(image, (224, 224)), tf.uint8)
      out.append(tf.cond(flip, lambda im=image: tf.image.flip_left_right(im), lambda im=image: im))
    return tuple(out)

  ds = tf.data.Dataset.from_tensor_slices((photos, sketches)).repeat().shuffle(len(photos))
  it = iter(ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(2))
  next(it)
  record = _timed(lambda: next(it), 2 * batch, steps, "tf.data Sketchy pairs")
  return {**record, "batch_size": batch, "threads": "autotune"}


def time_torchvision(files, batch, steps, workers) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"pipeline": "torchvision", "skipped": "torchvision is not installed"}
  from PIL import Image  # pylint: disable=g-import-not-at-top
  transform = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor()])

  class Files(torch.utils.data.Dataset):
    def __len__(self):
      return 1 << 30

    def __getitem__(self, i):
      with Image.open(files[i % len(files)]) as image:
        return transform(image.convert("RGB"))

  loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers,
                                       persistent_workers=workers > 0)
  it = iter(loader)
  next(it)
  record = _timed(lambda: next(it), batch, steps, f"torchvision DataLoader x{workers}")
  return {**record, "workers": workers}


def _timed(next_batch, batch, steps, name) -> dict:
  cpu, wall = _cpu_seconds(), time.perf_counter()
  for _ in range(steps):
    next_batch()
  cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
  return {"pipeline": name, "images_per_sec": batch * steps / wall,
          "cpu_seconds_per_image": cpu / (batch * steps), "batch_size": batch}


def time_jaxdml(recipe, data_dir, batch, steps, layout) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  overrides = []
  if layout != "default":
    workers, threads = layout.split("x")
    overrides = [f"--config.data.num_workers={workers}", f"--config.data.num_threads={threads}"]
  out = subprocess.run(
      [sys.executable, "-m", "jaxdml.bench", f"--config={repo}/configs/{recipe}",
       f"--config.data.data_dir={data_dir}", *overrides,
       "--measure=input", f"--batch_size={batch}", f"--steps={steps}", "--warmup=2"],
      capture_output=True, text=True, cwd=repo, check=True)
  record = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
  return {"pipeline": f"jaxdml {recipe}", "layout": layout, **record}


def main(argv):
  del argv
  root = _ROOT.value
  top = make_cub_tree(root, _NUM.value)
  files = sorted(glob.glob(os.path.join(top, "images", "*", "*.jpg")))
  sizes = [os.path.getsize(f) for f in files]
  print(json.dumps({"files": len(files), "mean_kb": np.mean(sizes) / 1024,
                    "host_cores": host.cores()}), flush=True)
  for f in files:  # into the page cache
    with open(f, "rb") as fh:
      fh.read()
  batch, steps = _BATCH.value, _STEPS.value
  if "jaxdml" in _PIPELINES.value:
    data_dir = prepare_for(root, _RECIPES.value, _NUM.value)
    for recipe in _RECIPES.value:
      # RAML's batch counts source images, each 8 views at 448 + 224: fewer per step.
      b = max(batch // 8, 2) if "raml" in recipe else batch
      for layout in _LAYOUTS.value:
        print(json.dumps(time_jaxdml(recipe, data_dir, b, steps, layout)), flush=True)
  if "tfdata" in _PIPELINES.value:
    for threads in _TFDATA_THREADS.value:
      print(json.dumps(time_tfdata(files, batch, steps, int(threads))), flush=True)
  if "tfdata_sketchy" in _PIPELINES.value:
    print(json.dumps(time_tfdata_sketchy(make_sketchy_tree(root, _NUM.value), batch, steps)),
          flush=True)
  if "torchvision" in _PIPELINES.value:
    for workers in _WORKERS.value:
      print(json.dumps(time_torchvision(files, batch, steps, int(workers))), flush=True)


if __name__ == "__main__":
  app.run(main)
