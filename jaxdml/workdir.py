"""What a run's workdir holds, besides its checkpoints and metrics.

`workdir/config.json` is the run's config as given, written when training
starts, so tools that read the run later (`--mode=eval`, export, the image
index) rebuild its model without `--config`.
"""

from __future__ import annotations

import json

import ml_collections

from jaxdml import paths

CONFIG_FILE = "config.json"


def save_config(config, workdir: str) -> None:
  """Writes `workdir/config.json` (atomically: a reader never sees half)."""
  paths.write_text_atomic(paths.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `save_config` wrote in `workdir`, its renamed fields moved
  where they went (`jaxdml.config.upgrade_saved`)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  path = paths.as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: runs trained before jaxdml wrote it have none. Pass the "
        "run's recipe with --config=configs/NAME.py:ARG (with any --config.FIELD "
        "overrides it was trained with).")
  return config_lib.upgrade_saved(ml_collections.ConfigDict(json.loads(path.read_text())))


class Start:
  """A training run's claim on its workdir, as a context manager.

  On entry it takes the workdir's lock (`run_lock.RunLock`; process 0 of a
  multi-host run, the others learn the outcome). Until `accepted()` the run
  has written nothing but the lock: the config validated, but the data, the
  checkpoint and the model are still being checked. On exit the lock is
  given back, and a start that was never accepted leaves the workdir as it
  found it (a workdir it created, empty again, is removed).
  """

  def __init__(self, workdir: str, **lock_kwargs):
    from jaxdml import run_lock  # pylint: disable=g-import-not-at-top
    self.workdir = workdir
    self.lock = run_lock.RunLock(workdir, **lock_kwargs)
    self._created = False
    self._accepted = False

  def __enter__(self) -> "Start":
    import jax  # pylint: disable=g-import-not-at-top
    from jaxdml import run_lock  # pylint: disable=g-import-not-at-top
    refused = None
    if jax.process_index() == 0:
      self._created = not paths.as_path(self.workdir).exists()
      try:
        note = self.lock.acquire()
        if note:
          print(note)
      except run_lock.WorkdirLockedError as error:
        refused = error
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top
      if int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))):
        raise refused or run_lock.WorkdirLockedError(
            f"{self.workdir} is in use by another training run (see process 0's message).")
    if refused is not None:
      raise refused
    return self

  def accepted(self) -> None:
    """From here on the run writes to its workdir."""
    self._accepted = True

  @property
  def lost(self) -> bool:
    """The lock was taken from this run (it was thought dead): stop writing."""
    return self.lock.lost

  def __exit__(self, *exc) -> None:
    self.lock.release()
    if not self._accepted and self._created:
      root = paths.as_path(self.workdir)
      if root.exists() and not any(root.iterdir()):
        root.rmdir()
