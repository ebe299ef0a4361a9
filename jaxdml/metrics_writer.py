"""`workdir/metrics.jsonl` plus TensorBoard summaries, from process 0 only."""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np


class MetricsWriter:
  """One JSON object per logged step or evaluation, with `step` first.

  On resume the file is cut back to the restored step, so lines logged after
  the last checkpoint of a crashed run do not appear twice.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    if tensorboard:
      self._tb = _tensorboard_writer(workdir)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(lines)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      scalars = {k: v for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
      self._tb.write_scalars(int(step), scalars)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _to_python(value):
  value = np.asarray(value)
  if value.ndim == 0:
    return value.item()
  return value.tolist()


def _tensorboard_writer(workdir: str):
  """CLU's summary writer needs TensorFlow; without it, jsonl only."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
  except ImportError as err:
    logging.warning("TensorBoard summaries off (%s); metrics.jsonl only.", err)
    return None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, for tests and notebooks."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]
