"""One training run per workdir: `workdir/jaxdml.lock`, in git's manner.

A run takes the lock before it writes anything and gives it back when it
ends, however it ends. A second run on the same workdir (a second
terminal, a resubmitted job) is refused with the holder named: its host,
pid and start time. Creating the lock is atomic: `O_CREAT | O_EXCL` on a
local disk, an upload with `ifGenerationMatch=0` on a bucket (GCS creates
the object only if none exists).

A run killed with SIGKILL cannot give its lock back. While it lives, the
holder rewrites its heartbeat every `heartbeat_s` from a background
thread; a lock is stale when its holder's process is gone (same host) or
its heartbeat is older than `stale_after_s` (another host), and a new run
takes it over with a note. The take-over is atomic too (a rename of the
stale file that only one taker can win; on a bucket, an overwrite
conditioned on the stale object's generation). A holder whose heartbeat
finds the lock taken from it (it was thought dead) sets `lost`; the loop
stops writing then.

Only training takes the lock: evaluation, export and indexing read a
workdir a run holds. Of a multi-host run's processes, process 0 holds it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid

from jaxdml import paths

LOCK_FILE = "jaxdml.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: float
  heartbeat: float
  token: str

  def describe(self, now: float | None = None) -> str:
    started = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
    ago = max(0, int((now or time.time()) - self.heartbeat))
    return f"pid {self.pid} on {self.host}, started {started}, last heartbeat {ago} s ago"

  def is_alive(self, stale_after_s: float, now: float | None = None) -> bool:
    """Whether this holder may still be running: on this host its process
    exists; elsewhere its heartbeat is recent."""
    if self.host == socket.gethostname():
      try:
        os.kill(self.pid, 0)
      except ProcessLookupError:
        return False
      except PermissionError:  # a process of another user: alive
        return True
      return True
    return (now or time.time()) - self.heartbeat < stale_after_s


def _new_holder() -> Holder:
  now = time.time()
  return Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)


def _parse(text: str) -> Holder | None:
  try:
    return Holder(**json.loads(text))
  except (ValueError, TypeError):  # cut short by a crash mid-write: stale
    return None


class _LocalFile:
  """The lock as a file on a local disk."""

  def __init__(self, path: str):
    self.path = path

  def create(self, text: str) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def read(self) -> tuple[str | None, object]:
    try:
      with open(self.path) as f:
        return f.read(), None
    except FileNotFoundError:
      return None, None

  def take_over(self, stale_version, text: str) -> bool:
    # Renaming the stale file away is atomic: of two takers one wins, the
    # other finds no file to rename and starts over.
    aside = f"{self.path}.stale-{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return False
    os.remove(aside)
    return self.create(text)

  def rewrite(self, version, text: str) -> object:
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, self.path)
    return None

  def remove(self, version) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


class _BucketObject:
  """The lock as a GCS object, every change conditioned on its generation."""

  def __init__(self, url: str):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    bucket, _, name = url.removeprefix("gs://").partition("/")
    self._blob = lambda: storage.Client().bucket(bucket).blob(name)
    self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)

  def create(self, text: str) -> bool:
    return self._upload(text, 0) is not None

  def read(self) -> tuple[str | None, object]:
    blob = self._blob()
    try:
      blob.reload()
      return blob.download_as_text(if_generation_match=blob.generation), blob.generation
    except self._failed:
      return None, None

  def take_over(self, stale_version, text: str) -> bool:
    return self._upload(text, stale_version) is not None

  def rewrite(self, version, text: str) -> object:
    generation = self._upload(text, version)
    if generation is None:
      raise WorkdirLockedError("the workdir lock was taken over by another run")
    return generation

  def remove(self, version) -> None:
    try:
      self._blob().delete(if_generation_match=version)
    except self._failed:
      pass

  def _upload(self, text: str, generation) -> object:
    blob = self._blob()
    try:
      blob.upload_from_string(text, if_generation_match=generation)
    except self._failed:
      return None
    return blob.generation


class RunLock:
  """`acquire()` before a run writes, `release()` when it ends."""

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
    self.path = paths.join(workdir, LOCK_FILE)
    self._workdir = workdir
    self._store = _BucketObject(self.path) if paths.is_url(self.path) else _LocalFile(self.path)
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.holder: Holder | None = None
    self.lost = False
    self._version = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> str | None:
    """Takes the lock; returns a note when it took over a stale one;
    WorkdirLockedError naming the holder when a live run has it."""
    paths.as_path(self._workdir).mkdir(parents=True, exist_ok=True)
    note = None
    for _ in range(5):  # another taker may win a race; look again
      holder = _new_holder()
      if self._store.create(json.dumps(dataclasses.asdict(holder))):
        self._took(holder)
        return note
      text, version = self._store.read()
      if text is None:  # given back between the two calls
        continue
      current = _parse(text)
      if current is not None and current.is_alive(self.stale_after_s):
        raise WorkdirLockedError(
            f"{self._workdir} is in use by another training run ({current.describe()}): "
            "one run per workdir. Wait for it to end, or use another --workdir. If that run "
            f"is gone, delete {self.path}.")
      if self._store.take_over(version, json.dumps(dataclasses.asdict(holder))):
        what = current.describe() if current else "a lock file cut short"
        note = f"Took over the stale lock of a run that is gone ({what})."
        self._took(holder)
        return note
    raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it.")

  def _took(self, holder: Holder) -> None:
    self.holder = holder
    _, self._version = self._store.read()
    self._thread = threading.Thread(target=self._beat, name="jaxdml-run-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      text, version = self._store.read()
      current = _parse(text) if text else None
      if current is None or current.token != self.holder.token:
        self.lost = True
        return
      self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
      try:
        self._version = self._store.rewrite(version, json.dumps(dataclasses.asdict(self.holder)))
      except WorkdirLockedError:
        self.lost = True
        return

  def release(self) -> None:
    """Gives the lock back (only if this run still holds it)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    if self.holder is None:
      return
    text, version = self._store.read()
    current = _parse(text) if text else None
    if current is not None and current.token == self.holder.token:
      self._store.remove(version)
    self.holder = None
