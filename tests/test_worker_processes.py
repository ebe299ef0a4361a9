"""Worker processes: order, errors, deaths and shutdown (jaxdml.data.worker_processes).

The pipeline's batches through these workers (same as threads, shared
memory recycled, closed at exit) are tested in test_data.py."""
import itertools
import os
import signal
import time

import numpy as np
import pytest

from jaxdml.data import worker_processes


def _numbered(first, stride, *, fail_at=None, die_at=None, stall_at=None):
  """Batches that say which step and which worker process made them."""
  for step in itertools.count(first, stride):
    if step == stall_at:
      time.sleep(3600)
    if step == fail_at:
      raise KeyError(f"no example for step {step}")
    if step == die_at:
      os.kill(os.getpid(), signal.SIGKILL)
    yield {"step": np.int64(step), "pid": os.getpid()}


def _batches(num_workers=3, start_step=7, **kw):
  import functools  # pylint: disable=g-import-not-at-top
  return worker_processes.WorkerBatches(functools.partial(_numbered, **kw), num_workers,
                                        start_step=start_step, prefetch=2, receive=dict)


def test_workers_take_turns_and_the_steps_come_in_order():
  batches = _batches()
  got = [next(batches) for _ in range(9)]
  assert [int(b["step"]) for b in got] == list(range(7, 16))
  pids = [b["pid"] for b in got]
  assert pids[:3] == pids[3:6] == pids[6:] and len(set(pids)) == 3  # worker i: steps 7 + i + 3k
  assert set(pids) == {p.pid for p in batches.processes}
  batches.close()
  assert not any(p.is_alive() for p in batches.processes)
  assert all(p.exitcode == 0 for p in batches.processes)  # stopped, not terminated


def test_a_workers_error_is_raised_here_with_its_traceback():
  batches = _batches(fail_at=10)  # worker 0's second batch
  assert [int(next(batches)["step"]) for _ in range(3)] == [7, 8, 9]
  with pytest.raises(KeyError, match="no example for step 10") as failure:
    next(batches)
  note = "\n".join(failure.value.__notes__)
  assert "data worker process 0, making the batch of step 10" in note and "_numbered" in note
  assert not any(p.is_alive() for p in batches.processes)  # the pipeline closed
  with pytest.raises(ValueError, match="closed"):
    next(batches)


def test_a_killed_worker_is_reported_not_waited_for():
  batches = _batches(num_workers=2, start_step=0, die_at=3)
  assert [int(next(batches)["step"]) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(RuntimeError, match=r"worker process 1 .* died with exit code -9 before "
                                         r"sending the batch of step 3"):
    next(batches)
  assert not any(p.is_alive() for p in batches.processes)


def test_a_dropped_pipeline_stops_its_workers():
  import gc  # pylint: disable=g-import-not-at-top
  batches = _batches(num_workers=2)
  next(batches)
  processes = batches.processes
  del batches
  gc.collect()
  for p in processes:
    p.join(timeout=30)
  assert [p.exitcode for p in processes] == [0, 0]


def test_a_stuck_worker_is_stopped_through_python(monkeypatch):
  """A worker that does not finish its batch gets SIGTERM, which it turns
  into an exit through Python (exit code 0, its shared memory unlinked by
  multiprocessing's finalizers), not a death that leaks segments."""
  monkeypatch.setattr(worker_processes, "_JOIN_SECONDS", 1.0)
  batches = _batches(num_workers=2, start_step=0, stall_at=1)
  assert int(next(batches)["step"]) == 0
  started = time.monotonic()
  batches.close()
  assert time.monotonic() - started < 10
  assert [p.exitcode for p in batches.processes] == [0, 0]


def test_an_interrupted_read_closes_the_pipeline(monkeypatch):
  """Ctrl-C while waiting for a batch may leave half a message in the
  pipe: the pipeline closes rather than misread the batches after it."""
  monkeypatch.setattr(worker_processes, "_JOIN_SECONDS", 1.0)  # the stalled worker

  def interrupt(*_):
    raise KeyboardInterrupt
  batches = _batches(num_workers=2, start_step=0, stall_at=1)
  next(batches)
  previous = signal.signal(signal.SIGALRM, interrupt)
  try:
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    with pytest.raises(KeyboardInterrupt):
      next(batches)  # worker 1 never sends step 1
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  with pytest.raises(ValueError, match="closed"):
    next(batches)
  assert not any(p.is_alive() for p in batches.processes)


def test_bad_layouts_are_refused():
  with pytest.raises(ValueError, match="at least one worker"):
    _batches(num_workers=0)
