"""jaxdml.bench: what it reports must mean the same on one device and on many."""
import os

import jax
import numpy as np
import pytest

from jaxdml import bench, config_lib

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
  record = bench._record("train_step", smoke_config(1), 16, 16, seconds, 16e9, 0.0, (1e9, "x"), 1)
  assert record["step_time_ms"] == 1e3
  assert record["step_time_ms_range"] == [1e3, 1e4]
