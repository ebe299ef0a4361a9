"""Stops a real run the way clusters do: SIGTERM at a random moment.

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

from jaxdml import train
from test_train import ROOT, load_config, losses_of

ARG = "smoke,distill=False"
TOTAL = 200  # far more than the run gets to: SIGTERM comes first


def _config():
  config = load_config("cub_obdsd.py", ARG)
  config.total_steps = TOTAL
  config.checkpoint_every = 1000
  config.log_every = 1
  config.eval.enabled = False
  return config


def test_sigterm_saves_the_current_step_and_the_rerun_continues_exactly(tmp_path):
  workdir = tmp_path / "preempted"
  command = [sys.executable, "-m", "jaxdml.main", f"--config=configs/cub_obdsd.py:{ARG}",
             f"--workdir={workdir}", f"--config.total_steps={TOTAL}",
             "--config.checkpoint_every=1000", "--config.log_every=1",
             "--config.eval.enabled=False"]
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

  config = _config()
  train.train_and_evaluate(config, str(workdir), stop_after=3)
  train.train_and_evaluate(config, str(tmp_path / "plain"), stop_after=stopped + 3)
  resumed, plain = losses_of(str(workdir)), losses_of(str(tmp_path / "plain"))
  assert len(resumed) == len(plain) == stopped + 3
  np.testing.assert_allclose(resumed, plain, rtol=1e-5)
