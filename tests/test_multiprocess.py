"""Two jax.distributed processes on localhost, 4 fake CPU devices each.

The pair must see one 8-device mesh, train exactly like one process with 8
devices, evaluate like it (each process embeds its share of the images; the
search puts only its own shards on the devices), write metrics.jsonl once
(process 0), and leave a checkpoint that one process restores and continues
from as if nothing had happened. Every
child runs under a timeout and is killed on it, so a hung collective fails
the test instead of hanging it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdml import metrics_writer, train
from test_train import ROOT, evaluation

import multiprocess_worker

pytestmark = pytest.mark.multiprocess
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def xla_flags_with_host_devices(n: int) -> str:
  """The suite's XLA flags (conftest) with `n` host devices instead of 8."""
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def run_pair(*args, workdir, timeout, poke=None):
  """Runs the worker as processes 0 and 1; fails with their logs on error.
  `poke(procs)` is called while they run until it returns True (to signal
  one of them); it must have been, by the end."""
  port = free_port()
  os.makedirs(workdir, exist_ok=True)
  procs, logs = [], []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_host_devices(4),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    env.pop("JAXDML_NO_DISTRIBUTED", None)
    log = open(os.path.join(workdir, f"process_{i}.log"), "w+")
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    # A process that fails leaves its peer blocked in a collective: stop
    # waiting as soon as one fails, not at the deadline.
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if poke is not None and poke(procs):
        poke = None
      time.sleep(0.2)
  finally:
    killed = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  tails = []
  for i, log in enumerate(logs):
    log.seek(0)
    tails.append(f"--- process {i} (rc={procs[i].returncode}) ---\n"
                 + log.read()[-3000:])
    log.close()
  why = f"killed processes {killed} (timeout {timeout}s or a failed peer)\n" if killed else ""
  assert all(p.returncode == 0 for p in procs), why + "\n".join(tails)
  assert poke is None, "the processes ended before they could be signalled\n" + "\n".join(tails)
  return tails


def test_global_batch_spans_both_processes(tmp_path):
  run_pair("batch", str(tmp_path), workdir=str(tmp_path), timeout=180)
  for i in range(2):
    with open(tmp_path / f"batch_{i}.json") as f:
      seen = json.load(f)
    assert seen["process_count"] == 2 and seen["device_count"] == 8
    assert seen["local_device_count"] == 4 and seen["global_shape"] == [8]
    # Process 0's rows come first, as the data pipeline numbers them.
    assert seen["gathered"] == list(range(8))
    assert seen["weighted_sum"] == sum(i * (i + 1) for i in range(8))


def params_at(workdir, config, step):
  parts, ckpt = train.setup(config, workdir)
  state = ckpt.restore(parts.restore_target(), step)
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def assert_params_close(a, b):
  def check(path, x, y):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, a, b)


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics_writer.read_metrics(workdir) if "loss" in r}


def test_two_processes_train_like_one_and_one_process_resumes(tmp_path):
  config = multiprocess_worker.mp_config()  # 4 steps, checkpoints at 3 and 4.
  pair, single = str(tmp_path / "pair"), str(tmp_path / "single")
  run_pair("train", pair, "3", workdir=pair, timeout=540)
  # One line per step and one evaluation: only process 0 writes metrics.
  rows = metrics_writer.read_metrics(pair)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  (pair_eval,) = [r for r in rows if "recall@1" in r]
  # One process evaluating the same checkpoint gets the same metrics.
  single_eval = train.evaluate_checkpoint(config, pair)
  assert set(single_eval) == set(pair_eval) - {"step"}
  for key, value in single_eval.items():
    assert pair_eval[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

  evaluation(config, False)  # training only from here
  train.train_and_evaluate(config, single)  # One process, 8 devices, 4 steps.
  straight = losses(single)
  assert sorted(straight) == [1, 2, 3, 4]
  np.testing.assert_allclose([losses(pair)[s] for s in (1, 2, 3)],
                             [straight[s] for s in (1, 2, 3)], rtol=1e-5, atol=1e-5)
  assert_params_close(params_at(pair, config, 3), params_at(single, config, 3))

  # The pair's checkpoint, restored by one process, continues like the
  # uninterrupted run.
  train.train_and_evaluate(config, pair)
  np.testing.assert_allclose(losses(pair)[4], straight[4], rtol=1e-5, atol=1e-5)
  assert_params_close(params_at(pair, config, 4), params_at(single, config, 4))


@pytest.mark.slow  # ~35 s; one process's SIGTERM is test_preemption's, in the fast suite
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """A preempted host gets SIGTERM; its peer does not. JAX's preemption sync
  point makes both stop after the same step, save it together and exit 0."""
  workdir = str(tmp_path / "pair")

  def sigterm_process_1_once_training(procs):
    rows = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(rows) and os.path.getsize(rows) > 0:
      procs[1].send_signal(signal.SIGTERM)
      return True
    return False
  tails = run_pair("long", workdir, workdir=workdir, timeout=540,
                   poke=sigterm_process_1_once_training)
  steps = [int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 200, steps
  assert f"SIGTERM: stopped at step {steps[0]} of 200" in tails[0]
  assert sorted(losses(workdir)) == list(range(1, steps[0] + 1))


def test_scann_builds_one_index_for_both_processes(tmp_path):
  """Process 0 builds and searches; process 1 receives the same results,
  equal to one process searching alone."""
  from jaxdml import retrieval  # pylint: disable=g-import-not-at-top
  run_pair("scann", str(tmp_path), workdir=str(tmp_path), timeout=300)
  seen = []
  for i in range(2):
    with open(tmp_path / f"scann_{i}.json") as f:
      seen.append(json.load(f))
  assert [s["builds"] for s in seen] == [1, 0]
  gallery, query = multiprocess_worker.scann_gallery_and_query()
  scores, indices = retrieval.search(query, gallery, 5, backend="scann")
  for s in seen:
    np.testing.assert_array_equal(s["indices"], indices)
    np.testing.assert_allclose(s["scores"], scores, rtol=1e-6)
