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
