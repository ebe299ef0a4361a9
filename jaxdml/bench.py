"""Throughput benchmark: train step and inference images/s, FLOPs and MFU.

    python -m jaxdml.bench --config=configs/sketchy_rtl.py:demo [--batch_size=64] [--steps=20]

Prints one JSON object per measurement. Steady state only: compilation is
timed separately and every timed call ends in `block_until_ready`. FLOPs
come from XLA's cost analysis of the compiled executable; MFU is achieved
FLOP/s over the device's peak (dense bf16 for accelerators, a measured
float32 matmul rate on CPU). Needs only jax/flax/optax/orbax/ml_collections:
batches are random arrays, not the data pipeline.
"""

from __future__ import annotations

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags


def define_flags():
  """Command-line flags, defined only when run as a program: tests import
  this module beside others that define `--config` too."""
  config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_integer("steps", 10, "Timed steps per measurement (the median is reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_list("measure", ["train", "inference"], "What to measure.")
  flags.DEFINE_string("cpu_devices", "auto", "As jaxdml.main: CPU devices ('auto' or a count).")
  flags.mark_flags_as_required(["config"])


# Dense bf16 peak FLOP/s per device, from vendor data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def device_peak_flops(device=None) -> tuple[float, str]:
  """Peak FLOP/s of one device and where the figure comes from."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name], "datasheet_bf16"
  if device.platform == "cpu":
    return measured_matmul_flops(device), "measured_f32_matmul"
  return float("nan"), "unknown"


def measured_matmul_flops(device, n: int = 2048, repeats: int = 5) -> float:
  """A float32 matmul rate on one device, which uses all the host's cores: the practical CPU peak."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(x).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


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


def _record(kind, config, batch_size, images_per_step, step_seconds, flops, compile_s, peak,
            n_dev):
  """One JSON record; `n_dev` is the mesh's size, the devices the step ran on."""
  seconds = float(np.median(step_seconds))
  achieved = flops / seconds
  # A measured CPU peak is the whole host's, however many devices split it.
  peak_total = peak[0] * (jax.process_count() if peak[1] == "measured_f32_matmul" else n_dev)
  return {
      "measurement": kind, "model": config.model.to_dict(), "task": config.task,
      "image_size": int(config.data.image_size), "batch_size": batch_size,
      "images_per_sec": images_per_step / seconds, "step_time_ms": 1e3 * seconds,
      "step_time_ms_range": [1e3 * min(step_seconds), 1e3 * max(step_seconds)],
      "flops_per_image": flops / images_per_step, "achieved_flops": achieved,
      "mfu": achieved / peak_total, "peak_flops": peak_total,
      "peak_source": peak[1], "compile_s": compile_s,
      "device_kind": jax.devices()[0].device_kind, "device_count": n_dev,
      "jax_version": jax.__version__,
  }


def bench_train(config, batch_size: int, steps: int, warmup: int, peak) -> dict:
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
  flops = compiled_flops(compiled, parts.mesh.size)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  seconds = _time(one_step, steps, warmup)
  images = batch_size * (2 if config.task == "sbir" else 1)
  return _record("train_step", config, batch_size, images, seconds, flops, compile_s, peak,
                 parts.mesh.size)


def bench_inference(config, batch_size: int, steps: int, warmup: int, peak) -> dict:
  """The gallery tower's embedding function, as evaluation and export run it."""
  from jaxdml import build, sharding  # pylint: disable=g-import-not-at-top
  parts = build.build(config)
  mesh = parts.mesh
  size = int(config.data.image_size)
  variables = jax.jit(lambda r: build.model_variables(parts.init(r)),
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
  return _record("inference", config, batch_size, batch_size, seconds,
                 compiled_flops(compiled, mesh.size), compile_s, peak, mesh.size)


def main(argv):
  del argv
  config = flags.FLAGS.config
  batch_size = flags.FLAGS.batch_size or int(config.batch_size)
  from jaxdml import sharding  # pylint: disable=g-import-not-at-top
  sharding.use_cpu_cores_as_devices(flags.FLAGS.cpu_devices, batch_size)
  peak = device_peak_flops()
  runners = {"train": bench_train, "inference": bench_inference}
  for name in flags.FLAGS.measure:
    if name not in runners:
      raise app.UsageError(f"--measure={name}: expected one of {sorted(runners)}.")
    record = runners[name](config, batch_size, flags.FLAGS.steps, flags.FLAGS.warmup, peak)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
