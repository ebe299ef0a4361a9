"""`--cpu_devices`: a CPU host split into one JAX device per core."""
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxdml import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch_size,cores,expected", [
    (16, 2, 2), (15, 2, 1), (12, 5, 4), (96, 64, sharding.MAX_AUTO_CPU_DEVICES), (7, 1, 1)])
def test_auto_count_divides_the_batch_and_stays_within_the_cores(batch_size, cores, expected):
  assert sharding.auto_cpu_device_count(batch_size, cores) == expected


def test_an_explicit_host_device_count_is_left_alone():
  # conftest forces 8 host devices through XLA_FLAGS; "auto" must not fight it.
  assert sharding.use_cpu_cores_as_devices("auto", 16) is None
  assert jax.device_count() == 8


def test_too_late_or_malformed_requests_say_what_to_do():
  jax.devices()  # The backend is running.
  with pytest.raises(RuntimeError, match="before any JAX computation"):
    sharding.use_cpu_cores_as_devices("3", 16)
  with pytest.raises(ValueError, match="--cpu_devices='two'"):
    sharding.use_cpu_cores_as_devices("two", 16)


@pytest.mark.parametrize("flag,expected", [
    ("auto", sharding.auto_cpu_device_count(48, len(os.sched_getaffinity(0)))),
    pytest.param("3", 3, marks=pytest.mark.slow)])  # the same path with an explicit count
def test_bench_runs_data_parallel_on_the_requested_host_devices(flag, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "jaxdml.bench", "--config=configs/encoder_bench.py:smoke=True",
       "--batch_size=48", "--steps=1", "--warmup=0", "--measure=train",
       f"--cpu_devices={flag}"],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["device_count"] == expected
  assert record["device_kind"] == "cpu"
