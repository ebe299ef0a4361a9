"""`workdir/metrics.jsonl` plus TensorBoard summaries, from process 0 only.

The workdir may be a URL (gs://...). Cloud objects cannot be appended to, so
there the whole file is rewritten on each write (it is small); TensorBoard
events are written to a local folder and copied after each flush, because
TensorFlow's own GCS client cannot reach a storage emulator (jaxdml.paths).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from jaxdml import paths


class MetricsWriter:
  """One JSON object per logged step or evaluation, with `step` first.

  On resume the file is cut back to the restored step, so lines logged after
  the last checkpoint of a crashed run do not appear twice.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = paths.as_path(workdir) / "metrics.jsonl"
    self._remote = paths.is_url(workdir)
    self._tb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = self._kept_until(resume_step)
    self._rewrite()
    if tensorboard:
      self._tb = _tensorboard_writer(workdir)

  def _kept_until(self, step: int) -> list[str]:
    """The lines up to `step`. A line cut short (a run killed while writing
    it) is set aside in a side file, with a note: the run goes on."""
    if not self.path.exists():
      return []
    kept, torn = [], []
    for line in filter(str.strip, self.path.read_text().splitlines()):
      row = _parse(line)
      if row is None:
        torn.append(line)
      elif row.get("step", 0) <= step:
        kept.append(line + "\n")
    if torn:
      side = self.path.parent / f"{self.path.name}.torn-{int(time.time())}"
      side.write_text("\n".join(torn) + "\n")
      print(f"{self.path}: {len(torn)} line(s) cut short by an interrupted write set aside in "
            f"{side}.")
    return kept

  def _rewrite(self) -> None:
    """The whole file at once: atomically on a local disk (a temporary file
    renamed), as one object upload on a bucket."""
    if self._remote:
      self.path.write_text("".join(self._lines))
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      f.writelines(self._lines)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    line = json.dumps(row) + "\n"
    self._lines.append(line)
    try:
      if self._remote:
        self._rewrite()
      else:
        with open(self.path, "a") as f:
          f.write(line)
    except OSError as error:
      raise OSError(f"Writing {self.path} failed ({type(error).__name__}: {error}). Free "
                    "space or fix permissions; a rerun resumes from the last checkpoint.") from None
    if self._tb is not None:
      scalars = {k: v for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
      try:
        self._tb.write_scalars(int(step), scalars)
        self._tb.flush()
      except Exception as error:  # pylint: disable=broad-except  (TensorFlow's, any kind)
        # The summaries are a copy of metrics.jsonl: losing them must not stop a run.
        logging.warning("TensorBoard summaries off from step %d on (%s: %s); metrics.jsonl "
                        "goes on.", step, type(error).__name__, error)
        self._tb = None

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _parse(line: str) -> dict | None:
  """A metrics line as a dict; None for a line cut short (or not a row)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) else None


def _to_python(value):
  value = np.asarray(value)
  if value.ndim == 0:
    return value.item()
  return value.tolist()


class _CopiedSummaryWriter:
  """TensorBoard events written locally, then copied to a URL after each
  flush (TensorFlow's GCS client cannot reach a storage emulator)."""

  def __init__(self, writer, local: str, destination):
    self._writer, self._local, self._destination = writer, local, destination

  def write_scalars(self, step, scalars):
    self._writer.write_scalars(step, scalars)

  def flush(self):
    self._writer.flush()
    paths.upload_tree(self._local, self._destination, replace=False)

  def close(self):
    self._writer.close()
    paths.upload_tree(self._local, self._destination, replace=False)
    shutil.rmtree(self._local, ignore_errors=True)


def _tensorboard_writer(workdir: str):
  """CLU's summary writer needs TensorFlow; without it, jsonl only."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    logging.warning("TensorBoard summaries off (%s; pip install 'jaxdml[tensorboard]'); "
                    "metrics.jsonl only.", err)
    return None
  destination = paths.join(workdir, "tensorboard")
  if not paths.is_url(workdir):
    return metric_writers.SummaryWriter(destination)
  local = tempfile.mkdtemp(prefix="jaxdml-tensorboard-")
  return _CopiedSummaryWriter(metric_writers.SummaryWriter(local), local, destination)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`, for tests and notebooks (a line
  cut short is skipped)."""
  text = (paths.as_path(workdir) / "metrics.jsonl").read_text()
  rows = [_parse(line) for line in filter(str.strip, text.splitlines())]
  return [row for row in rows if row is not None]
