"""The package as users install it: a core without TensorFlow, extras that
say what they bring, recipes and data set builders inside the wheel, one
version, console scripts."""

import email
import glob
import json
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

import jaxdml
from test_train import ROOT

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
  PYPROJECT = tomllib.load(f)

# What the core must not need: every optional dependency, as import names,
# and the test peers.
OPTIONAL = ("PIL", "cv2", "simplejpeg", "grain", "cloudpickle", "tensorflow",
            "tensorflow_datasets", "scann", "clu", "gcsfs", "safetensors", "sklearn", "torch",
            "pytorch_metric_learning", "faiss")
REFUSING = """
import sys
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {absent!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Refuse())
"""
# The library in a user's own loop, with the core alone: a loss and its
# gradient, a miner, the memory, exact search and metrics, an encoder, the
# train step; then the messages of two parts whose extra is missing.
CORE_USE = """
import json
import jax, jax.numpy as jnp, numpy as np
from jaxdml import build, extras, losses, memory, models, retrieval, train
from jaxdml import config as config_lib
from jaxdml.losses import miners
e = jax.random.normal(jax.random.key(0), (8, 4)); y = jnp.arange(8) % 4
mined = miners.get("multi_similarity")(embeddings=e, labels=y)
value, grad = jax.value_and_grad(lambda e: losses.get("triplet")(
    embeddings=e, labels=y, mined=mined)[0])(e)
mem = memory.enqueue(memory.init(16, 4), e, y)
scores, ids = retrieval.search(np.asarray(e), np.asarray(e), 2, exclude_self=True)
recall = retrieval.evaluate(np.asarray(e), np.asarray(y), ks=(1,))["recall@1"]
net = models.get("resnet_tiny", embed_dim=4)
config = config_lib.load_config("encoder_bench", "smoke=True")
parts = build.build(config)
batch = {"image": np.zeros((8, 32, 32, 3), np.uint8), "label": np.arange(8) % 4}
from jaxdml import sharding
state, metrics = train.make_train_step(parts)(parts.create_state(),
                                              sharding.global_batch(batch, parts.mesh))
missing = {}
try:
  next(parts.train_batches(0))
except extras.MissingExtraError as error:
  missing["data"] = str(error)
try:
  retrieval.search(np.asarray(e), np.asarray(e), 2, backend="scann")
except extras.MissingExtraError as error:
  missing["scann"] = str(error)
print(json.dumps({"loss": float(value), "finite": bool(metrics["finite"]),
                  "fill": int(mem["valid"].sum()), "recall": recall, "missing": missing}))
"""


def test_every_package_is_listed_and_the_recipes_and_builders_are_inside_jaxdml():
  listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
  found = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".")
           for p in glob.glob(os.path.join(ROOT, "jaxdml", "**", "__init__.py"), recursive=True)}
  mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
  assert mapped == {"jaxdml.configs": "configs", "jaxdml.data_prep": "data_prep"}
  assert listed == found | set(mapped)


def test_the_core_runs_a_users_loop_without_any_extra(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  code = REFUSING.format(absent=OPTIONAL) + CORE_USE
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["loss"] > 0 and result["finite"] and result["fill"] == 8
  assert 0 <= result["recall"] <= 1
  assert "pip install 'jaxdml[data]'" in result["missing"]["data"]
  assert "pip install 'jaxdml[scann]'" in result["missing"]["scann"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", "-w", str(out), ROOT],
                 check=True, capture_output=True, timeout=600)
  [path] = glob.glob(str(out / "jaxdml-*.whl"))
  return path


def test_the_wheel_ships_recipes_builders_license_and_one_version(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(z.read(info))
    scripts = z.read(info.replace("METADATA", "entry_points.txt")).decode()
  assert "jaxdml/configs/sketchy_rtl.py" in names and "jaxdml/data_prep/build.py" in names
  assert "jaxdml/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
  assert not any(n.startswith(("configs/", "data_prep/", "tests/", "benchmarks/")) for n in names)
  assert metadata["Version"] == jaxdml.__version__
  requires = metadata.get_all("Requires-Dist")
  core = sorted(r.split(">")[0].split("=")[0].split("<")[0] for r in requires if "extra ==" not in r)
  assert core == ["absl-py", "flax", "jax", "ml-collections", "numpy", "optax",
                  "orbax-checkpoint", "tqdm"]
  assert all("extra ==" in r for r in requires if r.startswith(("tensorflow", "scann", "opencv")))
  for script in ("jaxdml-train", "jaxdml-index", "jaxdml-search", "jaxdml-bench",
                 "jaxdml-prepare-data"):
    assert f"{script} =" in scripts


@pytest.mark.slow  # pip installs from the package index: ~2-4 minutes.
def test_an_installed_wheel_trains_a_recipe_by_name_from_an_empty_folder(wheel, tmp_path):
  """A fresh venv: the core wheel holds no TensorFlow, TFDS, ScaNN or OpenCV
  and imports the library; with the data extra, `jaxdml-train` runs the
  smoke recipe named, not pathed, in a folder with nothing else."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
  subprocess.run(pip + [wheel], check=True, capture_output=True, timeout=900)
  listed = subprocess.run(pip[:3] + ["list", "--format=freeze"], capture_output=True,
                          text=True, check=True).stdout.lower()
  for absent in ("tensorflow", "tensorflow-datasets", "scann", "opencv-python-headless"):
    assert f"\n{absent}==" not in "\n" + listed, absent
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  check = ("from jaxdml import losses, retrieval, memory, models; "
           "print(len(losses.names()), retrieval.search, memory.init, models.names()[:1])")
  subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True, cwd=tmp_path, env=env)
  subprocess.run(pip + [f"{wheel}[data]"], check=True, capture_output=True, timeout=900)
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = subprocess.run([str(venv / "bin" / "jaxdml-train"), "--config=sketchy_rtl:smoke",
                         "--workdir=w"], cwd=empty, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (empty / "w" / "metrics.jsonl").exists()
