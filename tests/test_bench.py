"""jaxdml.bench: what it reports must mean the same on one device and on many."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdml import build
from jaxdml import config as config_lib
from jaxdml.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_devices):
  config = config_lib.load_config(os.path.join(ROOT, "configs", "encoder_bench.py"), "smoke=True")
  config.mesh.data = data_devices
  return config


def test_flops_are_counted_over_all_devices():
  """XLA's cost analysis is per device: an 8-way data-parallel step must
  report about the FLOPs per image of the one-device step, not an eighth."""
  assert jax.device_count() == 8
  peak = (1e9, "test")
  one, eight = (bench.bench_train(smoke_config(n), 16, steps=2, warmup=0, peak=peak)
                for n in (1, -1))
  assert (one["device_count"], eight["device_count"], one["batch_size"]) == (1, 8, 16)
  # Each device computes the (replicated) loss over the gathered batch: a
  # little more work in total, never 8x less.
  assert 0.95 < eight["flops_per_image"] / one["flops_per_image"] < 1.3
  for record in (one, eight):
    low, high = record["step_time_ms_range"]
    assert 0 < low <= record["step_time_ms"] <= high
    assert record["images_per_sec"] == pytest.approx(16e3 / record["step_time_ms"])
    assert record["achieved_flops"] == pytest.approx(
        record["flops_per_image"] * record["images_per_sec"])


def test_median_ignores_one_slow_step(monkeypatch):
  """The reported step time is the median: one stalled call (a noisy
  neighbour on a shared machine) must not move it."""
  calls = iter([0.0, 1.0, 1.0, 11.0, 11.0, 12.0, 12.0, 13.0, 13.0, 14.0])
  monkeypatch.setattr(bench.time, "perf_counter", lambda: next(calls))
  seconds = bench._time(lambda: np.zeros(()), steps=5, warmup=0)
  assert seconds == [1.0, 10.0, 1.0, 1.0, 1.0]
  parts = build.build(smoke_config(1))
  record = bench._record("train_step", parts, 16, 16, seconds, 16e9, 0.0, (1e9, "x"))
  assert record["step_time_ms"] == 1e3
  assert record["step_time_ms_range"] == [1e3, 1e4]


class _Device:
  def __init__(self, kind, platform="gpu"):
    self.device_kind, self.platform = kind, platform


@pytest.mark.parametrize("kind,bf16,f32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 495e12), ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 418e12), ("NVIDIA H200", 989e12, 495e12),
    ("NVIDIA H200 NVL", 835e12, 418e12), ("NVIDIA B200", 2250e12, 1100e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 156e12), ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("NVIDIA L4", 121e12, 60e12), ("NVIDIA L40S", 362e12, 183e12), ("NVIDIA L40", 181e12, 90.5e12),
    ("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12), ("TPU v5", 459e12, 459e12),
    ("TPU v5p", 459e12, 459e12), ("TPU v6 lite", 918e12, 918e12)])
def test_peak_table_per_device_kind_and_dtype(kind, bf16, f32):
  """Device kinds as JAX names them: each finds its own row (an H100 PCIe is
  not an SXM, an L40S not an L4), and float32 gets the TF32/f32 column."""
  assert bench.device_peak_flops("bfloat16", _Device(kind)) == (bf16, "datasheet_bf16")
  assert bench.device_peak_flops("float16", _Device(kind))[0] == bf16
  assert bench.device_peak_flops("float32", _Device(kind)) == (f32, "datasheet_f32")
  assert np.isnan(bench.device_peak_flops("bfloat16", _Device("Some GPU"))[0])


def test_measured_cpu_peak_never_gives_an_mfu_above_one():
  parts = build.build(smoke_config(1))
  low_peak = (1e6, "measured_float32_matmul")
  record = bench._record("train_step", parts, 16, 16, [1.0], 16e9, 0.0, low_peak)
  assert record["mfu"] == 1.0 and record["peak_source"].endswith("_raised_to_achieved")
  record = bench._record("train_step", parts, 16, 16, [1.0], 16e9, 0.0, (32e9, "datasheet_f32"))
  assert record["mfu"] == 0.5 and record["dtype"] == "float32"


def test_batch_size_sweep_and_dtype_override():
  """One record per batch size and measurement, each in the dtype asked for;
  bf16 halves the parameter-free activations, not the float32 parameters."""
  records = list(bench.run(smoke_config(1), batch_sizes=[8, 16], measure=["inference"],
                           steps=1, warmup=0, dtype="bfloat16"))
  assert [(r["batch_size"], r["dtype"]) for r in records] == [(8, "bfloat16"), (16, "bfloat16")]
  assert all(r["peak_source"] == "measured_bfloat16_matmul" and 0 < r["mfu"] <= 1
             for r in records)
  assert records[1]["executable_bytes_per_device"] > records[0]["executable_bytes_per_device"]
  with pytest.raises(ValueError, match="measure=.*expected some of"):
    list(bench.run(smoke_config(1), batch_sizes=[8], measure=["speed"], steps=1, warmup=0))


BARE_REQUIREMENTS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections")


# The packages jaxdml depends on beyond BARE_REQUIREMENTS' closure (and the
# test extra), as import names.
NOT_ON_AN_ACCELERATOR_BOX = ("PIL", "simplejpeg", "cv2", "tqdm", "clu", "grain",
                             "tensorflow_datasets", "tensorflow", "scann", "safetensors",
                             "sklearn", "gcsfs", "torch", "pytorch_metric_learning", "faiss")
IMPORTS_REFUSED = """
import runpy, sys
class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {absent!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Refuse())
sys.argv = ["jaxdml.bench"] + {argv!r}
runpy.run_module("jaxdml.bench", run_name="__main__", alter_sys=True)
"""


def test_bench_runs_with_the_packages_an_accelerator_box_lacks_unimportable(tmp_path):
  """The fast stand-in for the venv test below: the same bench run, in this
  environment, with every package outside jax/flax/optax/orbax/ml_collections
  refused at import."""
  argv = [f"--config={ROOT}/configs/encoder_bench.py:smoke=True", "--batch_size=8",
          "--steps=1", "--warmup=0"]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  code = IMPORTS_REFUSED.format(absent=NOT_ON_AN_ACCELERATOR_BOX, argv=argv)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["measurement"] for r in records] == ["train_step", "inference"]


@pytest.mark.slow  # ~75 s of pip installs: the test above checks the same imports in CI.
def test_bench_runs_in_a_venv_with_only_jax_flax_optax_orbax_ml_collections(tmp_path):
  """What an accelerator box has: a fresh venv with those five (their own
  dependencies, the versions of this environment), jaxdml installed with
  --no-deps. `python -m jaxdml.bench` must run there: no tqdm, PIL,
  TensorFlow, grain or scann on its import path."""
  import importlib.metadata
  venv = tmp_path / "bare"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  pins = [f"{name}=={importlib.metadata.version(name)}" for name in BARE_REQUIREMENTS]
  pip = [python, "-m", "pip", "install", "-q"]
  # From the package index pip is configured with (a wheel cache makes it seconds).
  subprocess.run(pip + pins, check=True, capture_output=True)
  subprocess.run(pip + ["--no-deps", ROOT], check=True, capture_output=True)
  installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                             capture_output=True, text=True).stdout.lower()
  for absent in ("tqdm", "pillow", "tensorflow", "grain", "scann", "torch"):
    assert f"\n{absent}==" not in "\n" + installed, absent
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  proc = subprocess.run(
      [python, "-m", "jaxdml.bench", f"--config={ROOT}/configs/encoder_bench.py:smoke=True",
       "--batch_size=8", "--steps=1", "--warmup=0"],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["measurement"] for r in records] == ["train_step", "inference"]
  assert all(r["images_per_sec"] > 0 for r in records)


@pytest.mark.parametrize("recipe,views_per_image", [
    ("cub_obdsd.py", 1), ("sketchy_rtl.py", 1), ("cub_raml.py", None)])
def test_input_measurement_counts_source_images_and_views(recipe, views_per_image):
  """`--measure=input`: the recipe's own pipeline, no model. An SBIR pair is
  two source images; a RAML image yields `views.num` views at two sizes."""
  config = config_lib.load_config(os.path.join(ROOT, "configs", recipe), "smoke")
  record, = bench.run(config, batch_sizes=[8], measure=["input"], steps=2, warmup=1)
  assert record["measurement"] == "input_pipeline" and record["batch_size"] == 8
  if views_per_image is None:
    views_per_image = 2 * int(config.data.views["num"])
  ratio = record["views_per_sec"] / record["images_per_sec"]
  assert ratio == pytest.approx(views_per_image)
  assert record["cpu_seconds_per_image"] > 0 and record["workers"] >= 1


def test_input_cpu_seconds_count_live_worker_processes():
  """Worker processes do the input pipeline's work: their CPU is counted."""
  if not os.path.isdir("/proc"):
    pytest.skip("child processes' CPU is read from /proc")
  child = subprocess.Popen(  # burns 0.5 s of CPU, then waits alive
      [sys.executable, "-c", "import sys, time\nt = time.process_time()\n"
       "while time.process_time() - t < 0.5: pass\nprint('done', flush=True)\nsys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    cpu_seconds = bench._cpu_seconds  # pylint: disable=protected-access
    own, total = time.process_time(), cpu_seconds()
    assert child.stdout.readline() == "done\n"
    own, total = time.process_time() - own, cpu_seconds() - total
  finally:
    child.communicate("")
  assert own < 0.2 and total - own >= 0.4


def test_worker_busy_is_each_workers_cpu_over_the_window():
  before = {11: 2.0, 12: 5.0, 13: 0.0}
  after = {11: 3.0, 12: 5.5, 13: 9.0, 14: 1.0}  # 13: not a worker; 14: started inside the window
  assert bench.worker_busy(before, after, 2.0, {11, 12, 14}) == {"min": 0.25, "median": 0.375,
                                                                 "max": 0.5}
  assert bench.worker_busy(before, after, 1.0, {12}) == {"min": 0.5, "median": 0.5, "max": 0.5}
  assert bench.worker_busy(before, after, 1.0, set()) is None


def test_input_measurement_reports_its_worker_processes_busy(tmp_path):
  """With worker processes the record says how busy they were; without
  them it has no `worker_busy`. (Which children count as workers: the next
  test.)"""
  if not os.path.isdir("/proc"):
    pytest.skip("child processes' CPU is read from /proc")
  config = config_lib.load_config(os.path.join(ROOT, "configs", "cub_obdsd.py"), "smoke")
  config.data.cache_dir = str(tmp_path)
  config.data.num_workers, config.data.num_threads = 2, 1
  # ~0.3 s: /proc counts CPU in 10 ms ticks, which in a 10-30 ms window of
  # 24 batches read up to 2.6 s a second.
  record, = bench.run(config, batch_sizes=[8], measure=["input"], steps=1200, warmup=1)
  assert record["worker_kind"] == "processes" and record["workers"] == 2
  busy = record["worker_busy"]
  assert 0 <= busy["min"] <= busy["median"] <= busy["max"] < 1.5  # one thread each
  config.data.num_workers = 0
  record, = bench.run(config, batch_sizes=[8], measure=["input"], steps=2, warmup=1)
  assert "worker_busy" not in record


def test_the_workers_are_the_multiprocessing_children_not_the_resource_tracker():
  if not os.path.isdir("/proc"):
    pytest.skip("child processes are listed from /proc")
  from multiprocessing import shared_memory, resource_tracker  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  segment = shared_memory.SharedMemory(create=True, size=64)  # starts the tracker if not yet
  ctx = multiprocessing.get_context("spawn")
  stop = ctx.Event()
  worker = ctx.Process(target=stop.wait)
  worker.start()
  try:
    tracker = resource_tracker._resource_tracker._pid  # pylint: disable=protected-access
    from jaxdml import host  # pylint: disable=g-import-not-at-top
    children = set(host.child_pids(os.getpid()))
    assert {worker.pid, tracker} <= children
    workers = bench._worker_pids()  # pylint: disable=protected-access
    assert worker.pid in workers and tracker not in workers
  finally:
    stop.set()
    worker.join()
    segment.close()
    segment.unlink()


def test_before_timing_runs_once_between_the_warmup_and_the_timed_batches(monkeypatch, tmp_path):
  """benchmarks/core_scaling.py starts several processes' windows together
  with it: it must come after every warmup batch and before any timed one."""
  from jaxdml import data as data_lib  # pylint: disable=g-import-not-at-top
  drawn = []
  make = data_lib.train_batches

  def counted(*args, **kwargs):
    for batch in make(*args, **kwargs):
      drawn.append(1)
      yield batch

  monkeypatch.setattr(data_lib, "train_batches", counted)
  config = config_lib.load_config(os.path.join(ROOT, "configs", "cub_obdsd.py"), "smoke")
  config.data.cache_dir = str(tmp_path)
  config.data.num_workers = 0
  at_call = []
  record = bench.bench_input(config, 8, steps=3, warmup=2,
                             before_timing=lambda: at_call.append(len(drawn)))
  assert at_call == [2] and len(drawn) == 5 and record["steps"] == 3
