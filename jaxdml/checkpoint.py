"""Checkpoints: orbax CheckpointManager, atomic async saves, exact resume.

The whole train state (params, optimizer, batch statistics, memory, teacher,
step, RNG) is one pytree saved as one item. The data position needs no extra
item: the batch of step `s` is a pure function of `(seed, s)`, so restoring
`step` restores the iterator. Beside the state, a small JSON item records
what model the checkpoint belongs to, so a workdir reused for another model
fails with a clear message instead of a shape error deep inside orbax.
Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save never leaves a half checkpoint that a rerun would load.
A checkpoint damaged after its commit (a truncated array file, as a disk
error leaves it) is reported, moved to `workdir/damaged_checkpoints/STEP`
and the next older one restores (`restore_latest_good`).
"""

from __future__ import annotations

import json

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from jaxdml import paths


class WrongModelError(ValueError):
  """The checkpoint belongs to another model: never a reason to fall back."""


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
               create: bool = True):
    """`model_config` and `teacher_model` (the teacher's architecture, where
    it is not the student's) are recorded with every checkpoint: a restored
    run rebuilds both towers from its own checkpoint."""
    self.directory = paths.join(workdir, "checkpoints")  # local or a URL (gs://...)
    self.damaged_directory = paths.join(workdir, "damaged_checkpoints")
    self.every = int(every)
    as_json = lambda c: json.loads(c.to_json()) if hasattr(c, "to_json") else c
    self.model_description = as_json(model_config) or {}
    self.teacher_description = as_json(teacher_model)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every > 0 and step % self.every == 0)

  def save(self, step: int, state, *, force: bool = False) -> None:
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
    error, as is a workdir whose every checkpoint is damaged."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore(abstract_state, step), step
      except WrongModelError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (orbax/tensorstore raise many kinds)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        damaged.append(step)
        if jax.process_index() == 0:
          print(f"Checkpoint step {step} in {self.directory} does not restore "
                f"({type(error).__name__}: {first_line}); moving it to "
                f"{self.damaged_directory}/{step} and trying the one before.")
        self._set_aside(step)
    if damaged:
      raise RuntimeError(
          f"No checkpoint in {self.directory} restores (damaged steps {damaged}, moved to "
          f"{self.damaged_directory}). Delete {self.damaged_directory} and rerun to start "
          "over, or copy a good checkpoint into the directory.")
    return None, None

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
