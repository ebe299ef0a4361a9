"""Batches that worker processes render into shared memory they reuse.

grain's `SharedMemoryArray` makes a new segment for every batch, and the
training process unlinks it when done. Every batch then paid for fresh
pages twice: the worker faults in pages the kernel must zero, and the
training process maps them again. On the 2-core benchmark host a batch of
64 224 px images took 9-12 ms to write into a new segment against 0.5-0.8 ms
into one already mapped: ~150 us an image, a fifth of the pipeline's work
(docs/benchmarks.md).

Here a worker keeps its segments and reuses each one once the training
process is done with it:
- `SegmentPool` (worker): hands out arrays in segments nobody holds, and
  makes a new segment only when none is free.
- `Handle`: what the worker sends in an array's place (segment name, shape,
  dtype). The worker's pipe pickles it like any small object.
- `Mappings.open_arrays` (training process): maps the segment (the mapping
  is kept, so its pages are not faulted in again), wraps the array, and
  marks the segment free once that array and every view of it are gone.

The first byte of a segment says who holds it: set by the worker when it
claims the segment, cleared by the training process when its array dies.
Each side writes only its own transition, so no lock is shared. The array
dies only after its readers are done with it (a JAX array made from it
keeps it alive), and the worker's pipe (`processes`) orders the
worker's pixels before the training process reads them: a write and a read
of a pipe are system calls, full memory barriers.
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import secrets
import threading
import time
import weakref
from multiprocessing import shared_memory

import numpy as np

_HEADER = 64  # bytes before the array: the flag, and 64-byte alignment for XLA
_FREE, _HELD = 0, 1
# Free segments a worker keeps per array size; more are unlinked, so a
# training process that once held many batches does not pin their memory.
MAX_IDLE = 8


class _Segment(shared_memory.SharedMemory):
  """A segment whose mapping outlives this object while arrays use it: the
  last array's death unmaps it (Python's own `__del__` would report the
  BufferError of closing under a live array)."""

  def __del__(self):
    try:
      self.close()
    except BufferError:
      pass


class Handle:
  """An array a worker rendered into segment `name`, sent by name."""
  __slots__ = ("name", "shape", "dtype")

  def __init__(self, name: str, shape: tuple[int, ...], dtype: str):
    self.name, self.shape, self.dtype = name, shape, dtype

  def __getstate__(self):
    return (self.name, self.shape, self.dtype)

  def __setstate__(self, state):
    self.name, self.shape, self.dtype = state

  def __repr__(self):
    return f"Handle({self.name!r}, {self.shape}, {self.dtype!r})"


class SegmentPool:
  """A worker process's segments, one per array of a batch in flight;
  `max_idle` free ones kept per array size (`MAX_IDLE`)."""

  def __init__(self, max_idle: int = MAX_IDLE):
    self._max_idle = max_idle
    self._segments: list[tuple[shared_memory.SharedMemory, int]] = []  # (segment, nbytes)
    self._by_address: dict[int, shared_memory.SharedMemory] = {}
    self._names = (f"jaxdml_{os.getpid()}_{i}_{secrets.token_hex(4)}" for i in itertools.count())
    self._lock = threading.Lock()  # a worker may run several threads
    self._closed = False

  def array(self, shape, dtype) -> np.ndarray:
    """An array in a segment this worker now holds (contents undefined)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    with self._lock:
      if self._closed:
        # The worker is exiting, its segments unlinked, and a batch thread
        # still runs: a new segment would outlive it (Python's resource
        # tracker would unlink it, with a "leaked shared_memory" warning).
        raise RuntimeError("this worker's shared-memory pool is closed: the worker is exiting.")
      idle = [s for s, n in self._segments if n == nbytes and s.buf[0] == _FREE]
      if idle:
        segment = idle.pop(0)
      else:
        segment = _Segment(next(self._names), create=True, size=_HEADER + max(nbytes, 1))
        self._segments.append((segment, nbytes))
      for extra in idle[self._max_idle:]:
        self._drop(extra)
      segment.buf[0] = _HELD
      array, _ = _array_over(segment, shape, dtype)
      self._by_address[array.__array_interface__["data"][0]] = segment
      return array

  def _segment(self, array) -> shared_memory.SharedMemory:
    segment = self._by_address.get(array.__array_interface__["data"][0])
    if segment is None:
      raise ValueError("the array does not start a segment of this pool; pass the array "
                       "SegmentPool.array returned, or a reshape of it.")
    return segment

  def handle(self, array) -> Handle:
    """What to send in place of `array` (or a reshape of it)."""
    return Handle(self._segment(array).name, tuple(array.shape), array.dtype.str)

  def release(self, array) -> None:
    """Frees the segment of an array that will not be sent (a failed batch)."""
    self._segment(array).buf[0] = _FREE

  def _drop(self, segment):
    self._segments = [(s, n) for s, n in self._segments if s is not segment]
    self._by_address = {a: s for a, s in self._by_address.items() if s is not segment}
    # Unmapped by `_Segment.__del__` once nothing refers to it, or, while a
    # failed batch's arrays live on in its traceback, when the last one dies.
    segment.unlink()

  def close(self) -> None:
    """Unlinks every segment (at the worker's exit). The training process's
    mappings stay valid until it drops them."""
    with self._lock:
      self._closed = True
      for segment, _ in self._segments:  # arrays over them may still exist: no close()
        try:
          segment.unlink()
        except FileNotFoundError:
          pass
      self._segments, self._by_address = [], {}


def _array_over(segment, shape, dtype) -> tuple[np.ndarray, np.ndarray]:
  """`(array, root)`: every view of `array` keeps `root` alive (NumPy points
  views at the first array up the chain that holds the buffer).

  np.frombuffer holds the buffer, so closing the segment under a live array
  raises BufferError; np.ndarray(buffer=...) does not, and the array would
  point at unmapped memory.
  """
  root = np.frombuffer(segment.buf, dtype, math.prod(shape), offset=_HEADER)
  return root.reshape(shape), root


_pool: SegmentPool | None = None
_pool_pid: int | None = None  # a forked child makes its own pool
_pool_lock = threading.Lock()


def worker_pool() -> SegmentPool:
  """This worker process's pool, made on first use, its segments unlinked at
  exit."""
  global _pool, _pool_pid
  from multiprocessing import util  # pylint: disable=g-import-not-at-top
  with _pool_lock:
    if _pool is None or _pool_pid != os.getpid():
      _pool, _pool_pid = SegmentPool(), os.getpid()
      # A worker stops by letting its target return (or by SIGTERM, which
      # `processes` turns into an exit), after which multiprocessing
      # runs this; a killed worker leaves its segments to Python's
      # resource tracker.
      util.Finalize(_pool, _pool.close, exitpriority=10)
    return _pool


_watched_pid: int | None = None


def exit_with_parent() -> None:
  """Makes this worker process exit, its segments unlinked, once the
  training process is gone. Workers would outlive a training process
  killed outright (SIGKILL, the OOM killer), each keeping its memory and
  making batches nobody reads. Cheap to call for every batch."""
  global _watched_pid
  with _pool_lock:
    if _watched_pid == os.getpid():
      return
    _watched_pid = os.getpid()
  threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True,
                   name="jaxdml-exit-with-parent").start()


def _exit_when_orphaned(parent: int, poll_seconds: float = 1.0) -> None:
  while os.getppid() == parent:  # an orphan is handed to another parent
    time.sleep(poll_seconds)
  with _pool_lock:
    if _pool is not None and _pool_pid == os.getpid():
      _pool.close()
  os._exit(1)  # pylint: disable=protected-access


class Mappings:
  """A training process's mappings of its workers' segments, by name: one
  per pipeline, so they close when the pipeline and its arrays are gone.

  `max_idle`: mappings kept while no array uses them. Keep about as many as
  the workers cycle through, or segments get mapped (faulted in) again.
  """

  def __init__(self, max_idle: int = 64):
    self._max_idle = max_idle
    self._open: collections.OrderedDict[str, shared_memory.SharedMemory] = collections.OrderedDict()
    self._live: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def open_arrays(self, batch: dict) -> dict:
    """`batch` with its `Handle`s replaced by arrays over their segments."""
    return {k: self._array(v) if isinstance(v, Handle) else v for k, v in batch.items()}

  def _array(self, handle: Handle) -> np.ndarray:
    with self._lock:
      segment = self._open.get(handle.name)
      if segment is None:
        segment = self._open[handle.name] = _Segment(handle.name)
      self._open.move_to_end(handle.name)
      self._live[handle.name] += 1
      array, root = _array_over(segment, handle.shape, handle.dtype)
    weakref.finalize(root, self._release, handle.name)  # holds self: mappings outlive arrays
    return array

  def _release(self, name: str) -> None:
    with self._lock:
      self._open[name].buf[0] = _FREE  # the worker may reuse it now
      self._live[name] -= 1
      idle = [n for n in self._open if not self._live[n] and n != name]
      for n in idle[:max(0, len(idle) - self._max_idle)]:
        try:
          self._open[n].close()
        except BufferError:  # an array's buffer not yet released: next time
          continue
        del self._open[n], self._live[n]
