"""Checkpoints: orbax CheckpointManager, atomic async saves, exact resume.

The whole train state (params, optimizer, batch statistics, memory, teacher,
step, RNG) is one pytree saved as one item. The data position needs no extra
item: the batch of step `s` is a pure function of `(seed, s)`, so restoring
`step` restores the iterator. Beside the state, a small JSON item records
what model the checkpoint belongs to, so a workdir reused for another model
fails with a clear message instead of a shape error deep inside orbax.

A save is atomic. On a local disk orbax writes each step to a temporary
directory and renames it when complete; on a bucket (no renames) it writes
the step in place and commits it last with `commit_success.txt`. Either way
an interrupted save leaves an uncommitted step that no restore reads, and a
training run removes such leftovers when it starts (`cleanup_tmp_directories`).

Saves are asynchronous: a save that fails in the background (disk full,
permissions, a bucket gone) is caught as it fails (`check`) and stops the
run at its next step with one line naming the cause and the path; the last
good checkpoint stays the resume point.

Damaged checkpoints, one rule: a committed checkpoint that no longer
restores (a truncated array file, as a disk error leaves it) is reported in
one line, moved to `workdir/damaged_checkpoints/STEP`, and the next older
one restores. A rerun never starts over silently: while
`damaged_checkpoints/` holds steps and no good checkpoint is left, a
training run refuses to start until `damaged_checkpoints/` is deleted
(start from step 0) or a good checkpoint is put back.
"""

from __future__ import annotations

import json
import logging as py_logging
import re
import sys

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from jaxdml import paths


class WrongModelError(ValueError):
  """The checkpoint belongs to another model: never a reason to fall back."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the run stops."""


class DamagedCheckpointsError(RuntimeError):
  """The workdir holds only damaged checkpoints."""


_OS_CAUSES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
              "Permission denied")


def one_line(error: BaseException) -> str:
  """An exception as one readable line: a plain cause where the text names
  one (tensorstore nests "No space left on device" five levels deep),
  else its first line with object reprs dropped, 300 characters."""
  full = str(error)
  for cause in _OS_CAUSES:
    if cause in full:
      return f"{cause} ({type(error).__name__})"
  text = (full.strip().splitlines() or [""])[0]
  text = re.sub(r"<[^<>]*>", "", text)
  text = re.sub(r"\b\w+\(\{.*?\}\)", "", text)
  text = re.sub(r"\s+", " ", text).strip(" :;,")
  return f"{type(error).__name__}: {text}"[:300]


class _SaveFailures(py_logging.Filter):
  """Orbax's background threads log a failed save (with a traceback per
  thread and per array, hundreds of lines) and then clear the error:
  catch the first as it goes by, and keep the rest off the terminal, since
  `Checkpointer.check` reports the failure in one line."""

  def __init__(self):
    super().__init__()
    self.failure = None  # (step or None, exception)

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname or record.levelno < py_logging.ERROR:
      return True
    if self.failure is None:
      message = record.getMessage()
      step = re.search(r"\[step=(\d+)\]|/checkpoints/(\d+)", message)
      error = record.exc_info[1] if record.exc_info else RuntimeError(message)
      self.failure = (int(next(g for g in step.groups() if g)) if step else None, error)
    return False

  @property
  def failure(self):
    return self._failure

  @failure.setter
  def failure(self, value):
    global _A_SAVE_FAILED
    self._failure = value
    _A_SAVE_FAILED = _A_SAVE_FAILED or value is not None


_A_SAVE_FAILED = False  # in this process; see `_quiet_after_a_failed_save`


def _quiet_after_a_failed_save() -> None:
  """A failed save's orphaned writes still end after it, each with a
  traceback (dozens, racing and following the one-line report): orbax's
  write tasks as "Task exception was never retrieved" on the asyncio logger,
  and tensorstore's completions into the save's closed event loop as
  unraisable `RuntimeError: Event loop is closed`. Those are dropped: the
  failure itself reaches `Checkpointer.check`. Installed once per process."""
  previous_hook = sys.unraisablehook
  if hasattr(previous_hook, "jaxdml_quiets_failed_saves"):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and unraisable.exc_traceback is not None
            and unraisable.exc_traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
      previous_hook(unraisable)
  hook.jaxdml_quiets_failed_saves = True
  sys.unraisablehook = hook
  py_logging.getLogger("asyncio").addFilter(
      lambda record: not (_A_SAVE_FAILED or "orbax" in record.getMessage()))


def _fingerprint(abstract_state) -> dict:
  """Shapes of the parameters: what must match for a restore to make sense."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state.get("params", {}))
  return {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}


def _model_of(meta: dict) -> str:
  """The saved model description, for error messages."""
  return json.dumps(meta.get("model"), sort_keys=True)


class Checkpointer:
  """Saves and restores the train state under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, every: int = 1000,
               model_config=None, teacher_model=None, async_save: bool = True,
               read_only: bool = False):
    """`model_config` and `teacher_model` (the teacher's architecture, where
    it is not the student's) are recorded with every checkpoint: a restored
    run rebuilds both towers from its own checkpoint. A writer (the run
    that holds the workdir) removes uncommitted leftovers of an
    interrupted save when it starts and creates the directory when it
    first saves; `read_only` reads a workdir, even one a run is writing."""
    self.directory = paths.join(workdir, "checkpoints")  # local or a URL (gs://...)
    self.damaged_directory = paths.join(workdir, "damaged_checkpoints")
    self.every = int(every)
    as_json = lambda c: json.loads(c.to_json()) if hasattr(c, "to_json") else c
    self.model_description = as_json(model_config) or {}
    self.teacher_description = as_json(teacher_model)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=async_save,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    self._failures = _SaveFailures()
    self._created = False
    self._reported = False
    self._in_flight = None  # the newest save's step: a failure of no step is its
    if not read_only:
      py_logging.getLogger("absl").addFilter(self._failures)
      _quiet_after_a_failed_save()
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _failed(self, step, error) -> None:
    if self._failures.failure is None:
      self._failures.failure = (step, error)

  def check(self) -> None:
    """CheckpointSaveError, in one line, if a background save failed: the
    cause and the path, and where a rerun resumes."""
    if self._reported:
      return
    try:
      self.manager.check_for_errors()
    except Exception as error:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
      self._failed(None, error)
    if self._failures.failure is None:
      return
    step, error = self._failures.failure
    step = self._in_flight if step is None else step  # saves run one at a time
    self._reported = True
    self.manager.reload()  # the steps on disk now, not those orbax expected
    good = [s for s in self.manager.all_steps() if s != step]
    resume = f"step {max(good)}" if good else "step 0 (no checkpoint was written)"
    raise CheckpointSaveError(
        f"Saving checkpoint{f' step {step}' if step is not None else ''} to {self.directory} "
        f"failed ({one_line(error)}). The run stopped; a rerun resumes from {resume} once "
        "the cause is fixed (free disk space, permissions, the bucket).")

  def should_save(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state, *, force: bool = False) -> None:
    # Orbax waits for the previous save before it starts one anyway; waiting
    # here tells the previous save's failure from this one's.
    self.wait()
    self._in_flight = step
    try:
      if not self._created:  # the first save: from here on the run has checkpoints
        if jax.process_index() == 0:
          epath.Path(self.directory).mkdir(parents=True, exist_ok=True)
        self._created = True
      self._save(step, state, force)
    except Exception as error:  # pylint: disable=broad-except  (disk, permissions, bucket)
      self._failed(step, error)
    self.check()

  def _save(self, step: int, state, force: bool) -> None:
    meta = {"step": int(step), "model": self.model_description,
            "param_shapes": _fingerprint(state)}
    if self.teacher_description is not None:
      meta["teacher_model"] = self.teacher_description
    self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)

  def check_model(self, abstract_state, step: int) -> dict:
    """The step's metadata; WrongModelError unless its parameters have the
    shapes of `abstract_state["params"]`."""
    meta = self.meta(step)
    expected = _fingerprint(abstract_state)
    if meta.get("param_shapes") != expected:
      saved_model = _model_of(meta)
      wanted = json.dumps(self.model_description, sort_keys=True)
      diff = sorted(set(meta.get("param_shapes", {})) ^ set(expected))[:3]
      if not diff:
        diff = [k for k in expected if meta["param_shapes"].get(k) != expected[k]][:3]
      raise WrongModelError(
          f"The workdir's checkpoint ({self.directory}, step {step}) belongs to "
          f"another model: saved model {saved_model}, this config builds "
          f"{wanted}; first differing parameters: {diff}. Use a new --workdir "
          "or remove the old checkpoints.")
    return meta

  def restore(self, abstract_state, step: int | None = None):
    """Restores onto `abstract_state` (ShapeDtypeStructs with shardings)."""
    step = self._existing(step)
    self.check_model(abstract_state, step)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_latest_good(self, abstract_state):
    """`(state, step)` of the newest checkpoint that restores, or `(None, None)`
    when there is none. A newer one that fails (a damaged file) is reported in
    one line and moved to `damaged_checkpoints/`; one of another model is an
    error, as is a workdir whose checkpoints are all damaged, now or before
    (the module's rule: a rerun never starts over silently)."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step), step
      except WrongModelError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
        damaged.append(step)
        if jax.process_index() == 0:
          print(f"Checkpoint step {step} in {self.directory} does not restore "
                f"({one_line(error)}); moving it to {self.damaged_directory}/{step} and "
                "trying the one before.")
        self._set_aside(step)
    set_aside = self.damaged_steps()
    if set_aside:
      raise DamagedCheckpointsError(
          f"No checkpoint in {self.directory} restores: damaged steps {set_aside} are in "
          f"{self.damaged_directory}. A rerun refuses to start while that is so. To start "
          f"over from step 0, delete {self.damaged_directory}; to resume, copy a good "
          f"checkpoint into {self.directory}.")
    return None, None

  def damaged_steps(self) -> list[int]:
    """The steps set aside in `damaged_checkpoints/` (restored by no run)."""
    directory = epath.Path(self.damaged_directory)
    if not directory.exists():
      return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of orbax's sight (process 0; all wait)."""
    if jax.process_index() == 0:
      target = epath.Path(self.damaged_directory)
      target.mkdir(parents=True, exist_ok=True)
      destination = target / str(step)
      if destination.exists():
        destination.rmtree()
      epath.Path(self.directory, str(step)).rename(destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxdml_set_aside_{step}")
    self.manager.reload()

  def meta(self, step: int | None = None) -> dict:
    """The JSON written beside the state: step, model config, param shapes."""
    step = self._existing(step)
    return self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def saved_tree(self, step: int | None = None) -> dict:
    """The saved state's tree of array metadata (shapes, dtypes), by entry."""
    step = self._existing(step)
    # Orbax warns that a StandardSave item has no metadata file; the tree
    # metadata it needs is there.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      return dict(ocp.PyTreeCheckpointer().metadata(
          paths.join(self.directory, str(step), "state")).item_metadata.tree)
    finally:
      logging.set_verbosity(verbosity)

  def restore_as_saved(self, keys, sharding, step: int | None = None) -> dict:
    """The entries `keys` of a saved state as they were saved (their
    structure and shapes from the checkpoint), every array placed with
    `sharding`; entries the state has no arrays in are left out."""
    saved = self.saved_tree(step)
    wanted = {k: jax.tree.map(lambda _: sharding, saved[k]) for k in keys
              if k in saved and jax.tree.leaves(saved[k])}
    return self.restore_subset(wanted, step)

  def restore_subset(self, shardings: dict, step: int | None = None) -> dict:
    """Top-level entries of a saved state (e.g. `params`, `batch_stats`).

    `shardings` maps each wanted entry to a pytree of shardings; shapes and
    dtypes come from the checkpoint, nothing else of the state is read.
    """
    step = self._existing(step)
    saved = self.saved_tree(step)
    missing = sorted(set(shardings) - set(saved))
    if missing:
      raise ValueError(f"The checkpoint {self.directory} (step {step}) has no {missing}.")
    for key in shardings:
      if jax.tree.structure(saved[key]) != jax.tree.structure(shardings[key]):
        raise ValueError(f"The checkpoint {self.directory} (step {step}) holds {key} of "
                         f"another model (saved: {_model_of(self.meta(step))}).")
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        {k: saved[k] for k in shardings}, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return dict(restored["state"])

  def _existing(self, step: int | None) -> int:
    step = self.latest_step() if step is None else int(step)
    if step is None or step not in self.manager.all_steps():
      raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; "
                              f"it has steps {list(self.manager.all_steps())}.")
    return step

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  (a failed save, surfaced here)
      self._failed(None, error)
    self.check()

  def close(self) -> None:
    """Waits for the last save; CheckpointSaveError if it failed (unless
    that failure was reported already)."""
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception as error:  # pylint: disable=broad-except  (a failed save, surfaced here)
      self._failed(None, error)
    finally:
      py_logging.getLogger("absl").removeFilter(self._failures)
    self.check()
