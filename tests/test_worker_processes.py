"""Worker processes: order, balance, errors, deaths and shutdown
(jaxdml.data.workers.processes).

The pipeline's batches through these workers (same as threads, shared
memory recycled, no JAX in the workers, closed at exit) are tested in
test_data.py."""
import functools
import os
import signal
import time

import numpy as np
import pytest

from jaxdml.data.workers import processes as worker_processes


def _numbered(step, *, fail_at=None, die_at=None, stall_at=None, slow_flag=None):
  """A batch that says its step and which worker process made it. With
  `slow_flag` (a path), the first worker to create it makes each batch in
  50 ms, the others in 5 ms."""
  if step == stall_at:
    time.sleep(3600)
  if step == fail_at:
    raise KeyError(f"no example for step {step}")
  if step == die_at:
    os.kill(os.getpid(), signal.SIGKILL)
  if slow_flag:
    if not hasattr(_numbered, "slow"):
      try:
        os.close(os.open(slow_flag, os.O_CREAT | os.O_EXCL))
        _numbered.slow = True
      except FileExistsError:
        _numbered.slow = False
    time.sleep(0.05 if _numbered.slow else 0.005)
  return {"step": np.int64(step), "pid": os.getpid()}


def _batches(num_workers=3, start_step=7, threads=1, prefetch=2, **kw):
  return worker_processes.WorkerBatches(functools.partial(_numbered, **kw), num_workers,
                                        threads=threads, start_step=start_step,
                                        prefetch=prefetch, receive=dict)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_steps_come_in_order_whichever_worker_made_them(threads):
  batches = _batches(threads=threads)
  got = [next(batches) for _ in range(30)]
  assert [int(b["step"]) for b in got] == list(range(7, 37))
  assert {b["pid"] for b in got} <= {p.pid for p in batches.processes}
  batches.close()
  assert not any(p.is_alive() for p in batches.processes)
  assert all(p.exitcode == 0 for p in batches.processes)  # stopped, not terminated


def test_a_slow_worker_does_not_hold_the_others_back(tmp_path):
  """Steps go to whichever worker is free: batches taken round robin would
  make the slow worker (10x slower here) make a third of them. Batches
  leave in step order, so while the slow one makes a batch the others run
  at most the pool's credits ahead: its share is ~1 / (credits) at
  least. With 2 credits a worker (6 in all) that is ~10 of 60, which a
  loaded CI host overshot (12); with 4 (12 in all) it is ~5."""
  batches = _batches(slow_flag=str(tmp_path / "slow"), prefetch=4)
  got = [next(batches) for _ in range(60)]
  batches.close()
  made = sorted(sum(b["pid"] == p.pid for b in got) for p in batches.processes)
  assert sum(made) == 60 and made[0] <= 10, made


def test_a_workers_error_is_raised_in_its_turn_with_its_traceback():
  batches = _batches(fail_at=10)
  assert [int(next(batches)["step"]) for _ in range(3)] == [7, 8, 9]
  with pytest.raises(KeyError, match="no example for step 10") as failure:
    next(batches)
  note = "\n".join(failure.value.__notes__)
  assert "making the batch of step 10" in note and "_numbered" in note
  assert not any(p.is_alive() for p in batches.processes)  # the pipeline closed
  with pytest.raises(ValueError, match="closed"):
    next(batches)


class _Unloadable:
  """A batch maker that pickles but cannot be unpickled (a worker missing
  a module, say)."""

  def __call__(self, step):
    return {"step": step}

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    raise ImportError("no module named 'only_on_the_training_host'")


def test_a_worker_that_cannot_load_the_pipeline_reports_it_at_once():
  batches = worker_processes.WorkerBatches(_Unloadable(), 2, start_step=7, prefetch=2,
                                           receive=dict)
  with pytest.raises(ImportError, match="only_on_the_training_host") as failure:
    next(batches)
  assert "__setstate__" in "\n".join(failure.value.__notes__)  # the worker's traceback
  assert not any(p.is_alive() for p in batches.processes)


def test_a_killed_worker_is_reported_not_waited_for():
  batches = _batches(num_workers=2, start_step=0, die_at=3)
  with pytest.raises(RuntimeError, match=r"worker process \d \(pid \d+\) died with exit code -9"):
    for _ in range(10):
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
      next(batches)  # step 1 never comes
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  with pytest.raises(ValueError, match="closed"):
    next(batches)
  assert not any(p.is_alive() for p in batches.processes)


def test_bad_layouts_are_refused():
  with pytest.raises(ValueError, match="at least one worker"):
    _batches(num_workers=0)
