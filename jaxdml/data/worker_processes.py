"""Worker processes that make training batches and hand them over by pipe.

Worker i of n makes the batches of steps start + i, start + i + n, ... and
sends each down a pipe of its own; the training process reads the pipes
round robin: the same batches, in the same order, as threads alone make.
A batch's images travel as `shared_batches.Handle`s (names of shared memory
the worker rendered them into); `receive` maps them.

Why not grain's `mp_prefetch`, which this replaced: for every batch it
wakes a feeder thread in the worker, a reader thread here and then this
thread, and runs grain's per-element statistics on both sides. Against
independent processes on the same 2 cores (benchmarks/core_scaling.py,
12 interleaved rounds) two grain workers made 0.962 of their images/s and
spent 892 us of CPU an image against 865; these workers made 0.994 at
856 us (docs/benchmarks.md). Here the worker sends from its own loop, the
training process reads in the thread that asks for the batch, and a
semaphore per worker (`prefetch` credits) bounds the batches in flight:
no thread hands anything on.

A worker's error reaches the training process as the same exception, its
traceback in a note; a worker that dies (killed, out of memory) ends the
pipe, which is reported with its exit code. Workers ignore Ctrl-C, which
the terminal sends to them too: the training process stops them.
"""
from __future__ import annotations

import atexit
import multiprocessing
import pickle
import signal
import sys
import traceback
import weakref

_BATCH, _ERROR = "batch", "error"
_JOIN_SECONDS = 10.0  # a worker finishes the batch it is making, then exits


def _work(pickled_batches, first, stride, conn, credits, stop):
  """A worker's loop: a credit, a batch, a send; until `stop` or a closed pipe."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # terminate() as a last resort: exit through Python, which unlinks the
  # worker's shared memory (multiprocessing runs its finalizers).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  import cloudpickle  # pylint: disable=g-import-not-at-top
  try:
    batches = cloudpickle.loads(pickled_batches)(first, stride)
    while True:
      credits.acquire()
      if stop.is_set():
        return
      conn.send((_BATCH, next(batches)))
  except (BrokenPipeError, ConnectionResetError):  # the training process let go
    return
  except Exception as e:  # pylint: disable=broad-except
    try:
      conn.send((_ERROR, _picklable(e), traceback.format_exc()))
    except (BrokenPipeError, ConnectionResetError):
      pass


def _picklable(error: BaseException) -> BaseException:
  """`error` if it survives pickling, else a RuntimeError that names it."""
  try:
    pickle.loads(pickle.dumps(error))
    return error
  except Exception:  # pylint: disable=broad-except
    return RuntimeError(f"{type(error).__name__}: {error}")


class WorkerBatches:
  """Training batches from `num_workers` worker processes.

  Args:
    step_batches: picklable (cloudpickle) `(first, stride) -> iterator` of
      the batches of steps first, first + stride, ... as a worker sends them.
    num_workers: worker processes, started now.
    start_step: the first step's batch comes first.
    prefetch: batches each worker makes ahead of the one asked for.
    receive: applied here to each batch (maps its shared memory).

  `close()` stops the workers (at exit, for pipelines still open).
  """

  _open = weakref.WeakSet()

  def __init__(self, step_batches, num_workers: int, *, start_step: int, prefetch: int, receive):
    import cloudpickle  # pylint: disable=g-import-not-at-top
    if num_workers < 1 or prefetch < 1:
      raise ValueError(f"need at least one worker and one batch of prefetch; got num_workers="
                       f"{num_workers}, prefetch={prefetch}.")
    context = multiprocessing.get_context("spawn")  # JAX's threads do not survive fork
    pickled = cloudpickle.dumps(step_batches)
    self._receive, self._step, self._next = receive, start_step, 0
    self._stop = context.Event()
    self._conns, self._credits, self.processes = [], [], []
    for i in range(num_workers):
      reader, writer = context.Pipe(duplex=False)
      credits = context.Semaphore(prefetch)
      process = context.Process(
          target=_work, args=(pickled, start_step + i, num_workers, writer, credits, self._stop),
          name=f"jaxdml-data-worker-{i}", daemon=True)
      process.start()
      writer.close()  # the worker holds the only writer: its death ends the pipe
      self._conns.append(reader)
      self._credits.append(credits)
      self.processes.append(process)
    self._open.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._conns is None:
      raise ValueError("these training batches were closed; make new ones with train_batches.")
    i = self._next
    try:
      kind, *payload = self._conns[i].recv()
    except EOFError:
      process = self.processes[i]
      process.join(timeout=_JOIN_SECONDS)
      self.close()
      raise RuntimeError(
          f"data worker process {i} (pid {process.pid}) died with exit code {process.exitcode} "
          f"before sending the batch of step {self._step}; a negative code is the signal that "
          f"killed it ({-signal.SIGKILL}: often the out-of-memory killer: set "
          f"config.data.num_workers lower).") from None
    except BaseException:
      # Ctrl-C mid-message: the pipe may hold half a batch, which would
      # misread every batch after it.
      self.close()
      raise
    if kind == _ERROR:
      error, worker_traceback = payload
      self.close()
      error.add_note(f"Raised in data worker process {i}, making the batch of step "
                     f"{self._step}:\n{worker_traceback}")
      raise error
    self._credits[i].release()
    self._next, self._step = (i + 1) % len(self._conns), self._step + 1
    return self._receive(payload[0])

  def __del__(self):  # a pipeline let go of: its workers hold ~0.1 GB each
    self.close()

  def close(self):
    """Stops the workers: each finishes the batch it is making, if any."""
    if getattr(self, "_conns", None) is None:  # closed, or __init__ failed
      return
    self._stop.set()
    for credits in self._credits:  # wakes a worker waiting for a credit
      credits.release()
    for conn in self._conns:  # a worker waiting to send gets a broken pipe
      conn.close()
    for process in self.processes:
      process.join(timeout=_JOIN_SECONDS)
      if process.is_alive():  # stuck in a read, say: SIGTERM, then SIGKILL
        process.terminate()
        process.join(timeout=_JOIN_SECONDS)
      if process.is_alive():
        process.kill()
        process.join()
    self._conns = None
    self._open.discard(self)


@atexit.register
def _close_at_exit():
  # Before the interpreter tears down the modules a close needs.
  for batches in list(WorkerBatches._open):
    batches.close()
