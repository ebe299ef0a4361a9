"""Throughput benchmark: train step and inference images/s, FLOPs and MFU.

    python -m jaxdml.bench --config=configs/sketchy_rtl.py:demo [--batch_size=64,128] [--steps=20]
        [--dtype=bfloat16]

Prints one JSON object per measurement and batch size. Steady state only:
compilation is timed separately and every timed call ends in
`block_until_ready`. FLOPs come from XLA's cost analysis of the compiled
executable; MFU is achieved FLOP/s over the device's peak for the compute
dtype the model actually runs in (`PEAKS`: vendor data sheets for GPUs and
TPUs, a measured matmul rate on CPU). Train and inference need only jax,
flax, optax, orbax and ml_collections (a test runs them in a venv holding
nothing else): batches are random arrays, not the data pipeline.
`--measure=input` times the config's real training input pipeline alone
(data set, sampler, augmentation; no model) and needs the full install.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from jaxdml import host


def define_flags():
  """Command-line flags, defined only when run as a program: tests import
  this module beside others that define `--config` too."""
  config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
  flags.DEFINE_list("batch_size", None,
                    "Global batch sizes, one measurement each (default: the config's).")
  flags.DEFINE_enum("dtype", None, ["auto", "float32", "bfloat16", "float16"],
                    "Compute dtype of every tower (default: the config's model.dtype).")
  flags.DEFINE_integer("steps", 10, "Timed steps per measurement (the median is reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_list("measure", ["train", "inference"],
                    "What to measure: train, inference, input (the data pipeline alone).")
  flags.DEFINE_string("cpu_devices", "auto", "As jaxdml.main: CPU devices ('auto' or a count).")
  flags.mark_flags_as_required(["config"])


# Dense (no sparsity) peak FLOP/s per device from vendor data sheets, most
# specific name first: (device_kind pattern, bf16/fp16, float32). The float32
# column is what a float32 matmul runs at under JAX's default precision: TF32
# tensor cores on NVIDIA Ampere and later, one bf16 pass on TPU (its bf16 rate).
PEAKS = (
    (r"H100 PCIe", 756e12, 378e12),
    (r"H100 NVL", 835e12, 418e12),
    (r"H200 NVL", 835e12, 418e12),
    (r"H100", 989e12, 495e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200", 989e12, 495e12),  # SXM
    (r"B200", 2250e12, 1100e12),
    (r"A100", 312e12, 156e12),  # 40 and 80 GB, SXM and PCIe
    (r"L40S", 362e12, 183e12),
    (r"L40\b", 181e12, 90.5e12),
    (r"L4\b", 121e12, 60e12),
    (r"TPU v4", 275e12, 275e12),
    (r"TPU v5 ?lite|TPU v5e", 197e12, 197e12),
    (r"TPU v5p|TPU v5\b", 459e12, 459e12),  # after "v5 lite"
    (r"TPU v6 ?lite|TPU v6e", 918e12, 918e12),
)
_HALF = ("bfloat16", "float16")


def device_peak_flops(dtype: str = "float32", device=None) -> tuple[float, str]:
  """Peak FLOP/s of one device for matmuls in `dtype`, and where the figure comes from."""
  device = device or jax.devices()[0]
  for pattern, half, single in PEAKS:
    if re.search(pattern, device.device_kind, re.IGNORECASE):
      return (half, "datasheet_bf16") if dtype in _HALF else (single, "datasheet_f32")
  if device.platform == "cpu":
    return _measured_cpu_peak(device, dtype), f"measured_{dtype}_matmul"
  return float("nan"), "unknown"


@functools.lru_cache(maxsize=None)
def _measured_cpu_peak(device, dtype: str) -> float:
  # Once per process: a sweep or device_check measures many models. Half
  # precision runs ~10x below float32 on CPU, so its trials are 8x smaller.
  return measured_matmul_flops(device, dtype, n=2048 if dtype == "float32" else 1024)


def measured_matmul_flops(device, dtype: str = "float32", n: int = 2048, trials: int = 7) -> float:
  """The best of `trials` timed matmuls in `dtype` on one device, which uses
  all the host's cores: the practical CPU peak. The best, not the mean: a
  neighbour stealing a core makes one trial slow, never one fast, and a slow
  peak is what once reported an MFU of 1.18 here."""
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def compiled_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call over all devices.

  XLA's cost analysis describes the SPMD-partitioned program that each
  device runs, so it is scaled by the number of devices taking part.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return num_devices * float((analysis or {}).get("flops", float("nan")))


def random_batch(config, batch_size: int, rng: np.random.Generator) -> dict:
  size = int(config.data.image_size)
  image = lambda: rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(batch_size // 2), 2)[:batch_size].astype(np.int32)
  if config.task == "sbir":
    return {"sketch": image(), "photo": image(), "label": np.arange(batch_size, dtype=np.int32)}
  return {"image": image(), "label": labels}


def _time(fn, steps: int, warmup: int) -> list[float]:
  """Seconds of each timed call, each one waited for.

  Waiting per call costs one host sync (what a training loop that reads its
  metrics pays anyway) and lets the median ignore the slow calls a shared
  machine throws in; a mean over an asynchronous loop swung by 30 % here.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def _memory(compiled) -> dict:
  """Bytes one device holds for the executable (XLA's memory analysis: every
  platform) and the device's peak so far (where the runtime reports it)."""
  out = {}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out["executable_bytes_per_device"] = int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  return out


def _record(kind, parts, batch_size, images_per_step, step_seconds, flops, compile_s,
            peak=None, memory=None):
  """One JSON record of a measurement on `parts.mesh`; `flops` per call over
  all devices; `peak` overrides the per-device peak (FLOP/s, source) of the
  compute dtype the model runs in."""
  from jaxdml import models  # pylint: disable=g-import-not-at-top
  config, n_dev = parts.config, parts.mesh.size
  dtype = models.dtype_of(parts.model)
  peak = peak or device_peak_flops(dtype, parts.mesh.devices.flat[0])
  seconds = float(np.median(step_seconds))
  achieved = flops / seconds
  # A measured CPU peak is the whole host's, however many devices split it.
  measured = peak[1].startswith("measured")
  peak_total = peak[0] * (jax.process_count() if measured else n_dev)
  peak_source = peak[1]
  if measured and achieved > peak_total:
    # Cost analysis counts every op, the peak only a matmul: on a CPU whose
    # matmul trial was disturbed the ratio could pass 1. Say so, never report it.
    peak_total, peak_source = achieved, peak[1] + "_raised_to_achieved"
  return {
      "measurement": kind, "model": config.model.to_dict(), "task": config.task,
      "dtype": dtype, "image_size": int(config.data.image_size), "batch_size": batch_size,
      "images_per_sec": images_per_step / seconds, "step_time_ms": 1e3 * seconds,
      "step_time_ms_range": [1e3 * min(step_seconds), 1e3 * max(step_seconds)],
      "flops_per_image": flops / images_per_step, "achieved_flops": achieved,
      "mfu": achieved / peak_total, "peak_flops": peak_total,
      "peak_source": peak_source, "compile_s": compile_s, **(memory or {}),
      "device_kind": parts.mesh.devices.flat[0].device_kind, "device_count": n_dev,
      "jax_version": jax.__version__,
  }


def bench_train(config, batch_size: int, steps: int, warmup: int, peak=None) -> dict:
  """The jitted train step on random batches of the config's shapes."""
  from jaxdml import build, sharding, train  # pylint: disable=g-import-not-at-top
  parts = build.build(config)
  sharding.check_batch_size(batch_size, parts.mesh)
  state = parts.create_state()
  step_fn = train.make_train_step(parts)
  batch = sharding.global_batch(random_batch(config, batch_size, np.random.default_rng(0)),
                                parts.mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  seconds = _time(one_step, steps, warmup)
  images = batch_size * (2 if config.task == "sbir" else 1)
  return _record("train_step", parts, batch_size, images, seconds,
                 compiled_flops(compiled, parts.mesh.size), compile_s, peak, _memory(compiled))


def bench_inference(config, batch_size: int, steps: int, warmup: int, peak=None) -> dict:
  """The gallery tower's embedding function, as evaluation and export run it."""
  from jaxdml import build, inference, sharding  # pylint: disable=g-import-not-at-top
  parts = build.build(config)
  mesh = parts.mesh
  size = int(config.data.image_size)
  variables = jax.jit(lambda r: inference.model_variables(parts.init(r)),
                      out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  fn = jax.jit(parts.tower_fns()["gallery"],
               in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  images = sharding.global_batch(
      {"x": np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)},
      mesh)["x"]
  start = time.perf_counter()
  compiled = fn.lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  seconds = _time(lambda: compiled(variables, images), steps, warmup)
  return _record("inference", parts, batch_size, batch_size, seconds,
                 compiled_flops(compiled, mesh.size), compile_s, peak, _memory(compiled))


def bench_input(config, batch_size: int, steps: int, warmup: int, peak=None, *,
                before_timing=None) -> dict:
  """The config's training input pipeline alone (its data set, sampler and
  augmentation; no model, nothing put on a device), as one process feeds it.

  images: source images drawn from the data set (an SBIR pair is two);
  views: the images the batches hold (RAML: `views.num` x (hi + lo) per
  source image). CPU seconds are this process's, all its threads, and its
  worker processes' (`_cpu_seconds`). `worker_busy` (worker processes only):
  the least, median and most of the workers' CPU seconds per second of the
  timed window (1.0: a one-thread worker never waited). Workers claim
  steps as they come free, so all of them near 1.0: the workers set the
  pace; all well under 1.0: the training process does (docs/architecture.md).
  `before_timing()`, if given, runs after the warmup, just before the timed
  window: a barrier that starts several processes' windows together
  (benchmarks/core_scaling.py).
  """
  del peak
  from jaxdml import config as config_lib, data as data_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.resolve(config)
  batches = data_lib.train_batches(config.data, seed=int(config.seed),
                                   global_batch_size=batch_size, start_step=0, task=config.task)
  for _ in range(max(warmup, 1)):  # the first batch pays for opening the data set
    next(batches)
  if before_timing is not None:
    before_timing()
  views = 0
  children = host.child_cpu_seconds(os.getpid())
  cpu, wall = _cpu_seconds(children), time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
    views += sum(len(v) for v in batch.values() if np.ndim(v) == 4)  # image arrays
  wall = time.perf_counter() - wall
  children_after = host.child_cpu_seconds(os.getpid())
  cpu = _cpu_seconds(children_after) - cpu
  images = batch_size * steps * (2 if config.task == "sbir" else 1)
  busy = worker_busy(children, children_after, wall, _worker_pids())
  return {
      "measurement": "input_pipeline", "config_data": config.data.name, "task": config.task,
      "batch_size": batch_size, "steps": steps, "images_per_sec": images / wall,
      "views_per_sec": views / wall, "cpu_seconds_per_image": cpu / images,
      **_workers(config.data), **({"worker_busy": busy} if busy else {}),
      "host_cores": host.cores(), "seconds": wall}


def _cpu_seconds(children=None) -> float:
  """CPU seconds of this process (all threads) and of its live child
  processes (the data workers; `children` if read already), which Linux
  lists in /proc; elsewhere this process's alone."""
  if children is None:
    children = host.child_cpu_seconds(os.getpid())
  return time.process_time() + sum(children.values())


def _worker_pids() -> set[int]:
  """This process's multiprocessing children: the data workers, not the
  resource tracker that their shared memory starts beside them."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  return {p.pid for p in multiprocessing.active_children()}


def worker_busy(before: dict, after: dict, seconds: float, workers) -> dict | None:
  """`{"min", "median", "max"}` of the CPU seconds per second that each of
  `workers` (pids) spent between the `{pid: CPU seconds}` reads `before`
  and `after`, `seconds` apart; None without such workers."""
  busy = sorted((after[p] - before[p]) / seconds for p in workers if p in before and p in after)
  if not busy:
    return None
  return {"min": round(busy[0], 3), "median": round(float(np.median(busy)), 3),
          "max": round(busy[-1], 3)}


def _workers(data_config) -> dict:
  from jaxdml import data as data_lib  # pylint: disable=g-import-not-at-top
  processes, threads = data_lib.worker_layout(data_config)
  if processes:
    return {"workers": processes, "worker_kind": "processes", "threads_per_worker": threads}
  return {"workers": threads, "worker_kind": "threads"}


RUNNERS = {"train": bench_train, "inference": bench_inference, "input": bench_input}


def with_dtype(config, dtype: str | None):
  """`config` with every tower's compute dtype set to `dtype` (None: unchanged)."""
  if dtype is None:
    return config
  from jaxdml import models  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(models.with_dtype(config.model.to_dict(), dtype))
  return config


def run(config, *, batch_sizes, measure, steps: int, warmup: int, dtype=None):
  """Yields one record per (batch size, measurement)."""
  unknown = [m for m in measure if m not in RUNNERS]
  if unknown:
    raise ValueError(f"measure={unknown}: expected some of {sorted(RUNNERS)}.")
  config = with_dtype(config, dtype)
  for batch_size in batch_sizes:
    for name in measure:
      yield RUNNERS[name](config, int(batch_size), steps, warmup)


def main(argv):
  del argv
  config = flags.FLAGS.config
  batch_sizes = [int(b) for b in flags.FLAGS.batch_size or [config.batch_size]]
  from jaxdml import sharding  # pylint: disable=g-import-not-at-top
  sharding.use_cpu_cores_as_devices(flags.FLAGS.cpu_devices, math.gcd(*batch_sizes))
  try:
    for record in run(config, batch_sizes=batch_sizes, measure=flags.FLAGS.measure,
                      steps=flags.FLAGS.steps, warmup=flags.FLAGS.warmup,
                      dtype=flags.FLAGS.dtype):
      print(json.dumps(record), flush=True)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
