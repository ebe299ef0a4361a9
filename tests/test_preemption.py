"""Stops a real run the way clusters do: SIGTERM at a random moment, or
SIGKILL to the training process alone, whose worker processes must follow.

The run is `python -m jaxdml.main` in a subprocess; the signal arrives after
its first logged step, at a random delay. It must save the step it is at
(not a multiple of checkpoint_every), exit 0 saying how to resume, and the
rerun's losses must equal an uninterrupted run's.
"""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdml import host, train
from test_train import ROOT, losses_of, short_run

TOTAL = 200  # far more than the run gets to: SIGTERM comes first


def test_sigterm_saves_the_current_step_and_the_rerun_continues_exactly(tmp_path):
  workdir = tmp_path / "preempted"
  config, flags = short_run(TOTAL, checkpoint_every=1000)
  command = [sys.executable, "-m", "jaxdml.main", f"--workdir={workdir}", *flags]
  run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()):
    assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
    time.sleep(0.05)
  time.sleep(random.uniform(0.0, 1.0))
  run.send_signal(signal.SIGTERM)
  output, _ = run.communicate(timeout=300)
  assert run.returncode == 0, output[-3000:]
  assert "Rerun the same command to resume" in output
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) == 1 and 0 < steps[0] < TOTAL and steps[0] % 1000 != 0, steps
  stopped = steps[0]
  assert len(losses_of(str(workdir))) == stopped  # every step up to the stop was logged

  train.train_and_evaluate(config, str(workdir), stop_after=3)
  train.train_and_evaluate(config, str(tmp_path / "plain"), stop_after=stopped + 3)
  resumed, plain = losses_of(str(workdir)), losses_of(str(tmp_path / "plain"))
  assert len(resumed) == len(plain) == stopped + 3
  np.testing.assert_allclose(resumed, plain, rtol=1e-5)


def _running(pid) -> bool:
  return host.process_stat(pid)[:1] not in ([], ["Z"], ["X"])  # gone, or a zombie nobody reaped


@pytest.mark.slow  # ~1 min: a data set build and three runs
def test_a_run_on_jpeg_files_in_worker_processes_resumes_exactly_after_sigkill(tmp_path):
  """Prepared files default to worker processes and their recycled shared
  memory. The training process alone is killed after its first checkpoint:
  its workers must exit too, and the rerun must log the losses of one
  uninterrupted run whose threads make the same batches."""
  from jaxdml.data_prep import build  # pylint: disable=g-import-not-at-top
  from test_gcs import _cub_download  # pylint: disable=g-import-not-at-top
  _cub_download(tmp_path / "download", np.random.default_rng(0))
  data_dir = str(tmp_path / "tfds")
  build.build("cub", manual_dir=str(tmp_path / "download"), data_dir=data_dir,
              expect_counts="train=12,test=6")
  total = 8
  config, flags = short_run(total, checkpoint_every=2)
  workdir = tmp_path / "killed"
  command = [sys.executable, "-m", "jaxdml.main", f"--workdir={workdir}", *flags,
             "--config.data.name=cub", f"--config.data.data_dir={data_dir}",
             "--config.data.num_workers=2"]
  run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
  checkpoints, deadline = workdir / "checkpoints", time.time() + 300
  while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
    time.sleep(0.05)
  workers = host.child_pids(run.pid)
  assert len(workers) >= 2, workers  # the two workers (and Python's resource tracker)
  run.send_signal(signal.SIGKILL)
  run.communicate(timeout=60)  # the workers hold its output pipe until they exit
  deadline = time.time() + 30  # Python's resource tracker follows them, unlinking leftovers
  while [pid for pid in workers if _running(pid)]:
    assert time.time() < deadline, [pid for pid in workers if _running(pid)]
    time.sleep(0.1)
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert saved[-1] < total, saved  # killed before the end
  rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

  config.data.update(name="cub", data_dir=data_dir, num_workers=0)
  train.train_and_evaluate(config, str(tmp_path / "plain"))
  resumed, plain = losses_of(str(workdir)), losses_of(str(tmp_path / "plain"))
  assert len(resumed) == len(plain) == total
  np.testing.assert_allclose(resumed, plain, rtol=1e-5)


def test_a_worker_process_exits_once_the_training_process_is_killed():
  """`shared_batches.exit_with_parent`, which every worker process calls
  with its first batch: the child of a SIGKILLed process stops by itself."""
  watcher = ("import time; from jaxdml.data.workers import shared_batches; "
             "shared_batches.exit_with_parent(); print('watching', flush=True); time.sleep(120)")
  training = ("import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', {watcher!r}],\n"
              "                         stdout=subprocess.PIPE, text=True)\n"
              "assert child.stdout.readline() == 'watching\\n'\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
  run = subprocess.Popen([sys.executable, "-c", training], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
  worker = int(run.stdout.readline())
  assert _running(worker)
  run.kill()
  run.wait(timeout=30)
  deadline = time.time() + 30
  while _running(worker):
    assert time.time() < deadline, "the orphaned worker kept running"
    time.sleep(0.1)
