"""Worker processes that make training batches and hand them over by pipe.

Each worker claims the next step from a shared counter, makes its batch and
sends it down a pipe of its own; the training process takes the batches
back in step order. Which worker made a batch does not matter: the batch
of step s is a pure function of (seed, s), so the batches and their order
are the ones threads alone make. A batch's images travel as
`shared_batches.Handle`s (names of shared memory the worker rendered them
into); `receive` maps them when the batch's turn comes.

Why claimed steps, not worker i making steps i, i + n, ...: batches taken
round robin run every worker at the slowest one's pace, and on 2 busy
cores the less busy of two workers was on CPU a median 0.97 of the time
(docs/benchmarks.md). Why not grain's `mp_prefetch`, which these workers
replaced: for every batch it woke a feeder thread in the worker, a reader
thread here and then this thread, and ran grain's per-element statistics
on both sides; its workers spent 1.5-5 % more CPU an image than
independent processes. Here a worker sends from the thread that made the
batch, and the training process reads in the thread that asks for it.

Credits bound the batches in flight: `prefetch` a worker in all, and twice
that for any one worker, so a fast worker runs ahead of a slow one without
holding the memory of the whole pool.

A worker's error reaches the training process as the same exception, its
traceback in a note, when its step's turn comes; a worker that dies
(killed, out of memory) ends its pipe, which is reported with its exit
code. Workers ignore Ctrl-C, which the terminal sends to them too: the
training process stops them.
"""
from __future__ import annotations

import atexit
import multiprocessing
from multiprocessing import connection
import pickle
import signal
import sys
import threading
import traceback
import weakref

from jaxdml import extras

_BATCH, _ERROR = "batch", "error"
_JOIN_SECONDS = 10.0  # a worker finishes the batch it is making, then exits


def _work(pickled_make_batch, threads, conn, own_credits, credits, next_step, stop):
  """A worker: `threads` threads that each claim a step, make its batch and
  send it; until `stop`, a closed pipe or an error."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # terminate() as a last resort: exit through Python, which unlinks the
  # worker's shared memory (multiprocessing runs its finalizers).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  cloudpickle = extras.require("cloudpickle", "the data pipeline's worker processes")
  send_lock, failed = threading.Lock(), threading.Event()

  def send(message):
    with send_lock:
      conn.send(message)

  def send_error(step, error):
    failed.set()
    try:
      send((_ERROR, step, _picklable(error), traceback.format_exc()))
    except (BrokenPipeError, ConnectionResetError):
      pass

  try:  # once: the worker's threads share its sources and caches
    make_batch = cloudpickle.loads(pickled_make_batch)
  except Exception as e:  # pylint: disable=broad-except
    send_error(None, e)
    return

  def loop():
    step = None
    try:
      while not failed.is_set():
        own_credits.acquire()
        credits.acquire()
        if stop.is_set():
          return
        with next_step.get_lock():
          step = next_step.value
          next_step.value = step + 1
        send((_BATCH, step, make_batch(step)))
    except (BrokenPipeError, ConnectionResetError):  # the training process let go
      return
    except Exception as e:  # pylint: disable=broad-except
      send_error(step, e)

  others = [threading.Thread(target=loop, daemon=True) for _ in range(threads - 1)]
  for thread in others:
    thread.start()
  loop()
  for thread in others:  # after an error, each sends the batch it claimed
    thread.join()


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
    make_batch: picklable (cloudpickle) `step -> batch`.
    num_workers: worker processes, started now.
    threads: threads in each worker, each making whole batches.
    start_step: the first step's batch comes first.
    prefetch: batches made ahead, per worker (`prefetch * num_workers` in
      all; at most twice `prefetch` by any one worker).
    receive: applied here to each batch in its turn (maps its shared memory).

  `close()` stops the workers (at exit, for pipelines still open).
  """

  _open = weakref.WeakSet()

  def __init__(self, make_batch, num_workers: int, *, threads: int = 1, start_step: int,
               prefetch: int, receive):
    cloudpickle = extras.require("cloudpickle", "the data pipeline's worker processes")
    if num_workers < 1 or threads < 1 or prefetch < 1:
      raise ValueError(f"need at least one worker, thread and batch of prefetch; got num_workers="
                       f"{num_workers}, threads={threads}, prefetch={prefetch}.")
    context = multiprocessing.get_context("spawn")  # JAX's threads do not survive fork
    pickled = cloudpickle.dumps(make_batch)
    self._receive, self._step, self._threads = receive, start_step, threads
    self._ready = {}  # step -> (worker, message): batches (and errors) ahead of their turn
    self._failed = set()  # workers that sent an error and stopped
    self._stop = context.Event()
    self._credits = context.Semaphore(prefetch * num_workers)
    # Held here: the child unpickles it after start() returns, and a named
    # semaphore whose last owner here died is unlinked.
    self._next_step = context.Value("q", start_step)
    self._conns, self._own_credits, self.processes = [], [], []
    for i in range(num_workers):
      reader, writer = context.Pipe(duplex=False)
      own_credits = context.Semaphore(2 * prefetch)
      process = context.Process(
          target=_work,
          args=(pickled, threads, writer, own_credits, self._credits, self._next_step,
                self._stop),
          name=f"jaxdml-data-worker-{i}", daemon=True)
      process.start()
      writer.close()  # the worker holds the only writer: its death ends the pipe
      self._conns.append(reader)
      self._own_credits.append(own_credits)
      self.processes.append(process)
    self._live = list(self._conns)  # pipes that may still send
    self._open.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._conns is None:
      raise ValueError("these training batches were closed; make new ones with train_batches.")
    try:
      while self._step not in self._ready:
        if not self._live:  # every worker stopped on an error: the first is raised
          if not self._ready:
            raise RuntimeError("every data worker process stopped; see the errors above.")
          self._step = min(self._ready)
          break
        self._read(connection.wait(self._live))
    except BaseException:
      # An error, or Ctrl-C mid-message: the pipe may hold half a batch,
      # which would misread every batch after it.
      self.close()
      raise
    worker, message = self._ready.pop(self._step)
    if message[0] == _ERROR:
      self.close()
      error, worker_traceback = message[2:]
      error.add_note(f"Raised in data worker process {worker}, making the batch of step "
                     f"{self._step}:\n{worker_traceback}")
      raise error
    self._own_credits[worker].release()
    self._credits.release()
    self._step += 1
    return self._receive(message[2])

  def _read(self, readable):
    for conn in readable:
      worker = self._conns.index(conn)
      try:
        message = conn.recv()
      except EOFError:
        if worker in self._failed:  # its error waits for its turn
          self._live.remove(conn)
          continue
        process = self.processes[worker]
        process.join(timeout=_JOIN_SECONDS)
        raise RuntimeError(
            f"data worker process {worker} (pid {process.pid}) died with exit code "
            f"{process.exitcode} while the batch of step {self._step} was awaited; a negative "
            f"code is the signal that killed it ({-signal.SIGKILL}: often the out-of-memory "
            f"killer: set config.data.num_workers lower).") from None
      if message[0] == _ERROR:
        self._failed.add(worker)
      # An error without a step failed before claiming one: it is raised now.
      self._ready[self._step if message[1] is None else message[1]] = (worker, message)

  def __del__(self):  # a pipeline let go of: its workers hold ~0.1 GB each
    self.close()

  def close(self):
    """Stops the workers: each finishes the batch it is making, if any."""
    if getattr(self, "_conns", None) is None:  # closed, or __init__ failed
      return
    self._stop.set()
    for own_credits in self._own_credits:  # wakes the worker's threads waiting for credits
      for _ in range(self._threads):
        own_credits.release()
        self._credits.release()
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
    self._conns, self._ready = None, {}
    self._open.discard(self)


@atexit.register
def _close_at_exit():
  # Before the interpreter tears down the modules a close needs.
  for batches in list(WorkerBatches._open):
    batches.close()
