"""What every evaluator is: its data loaded once, then metrics per run."""

from __future__ import annotations

import numpy as np


class Evaluator:
  """One evaluator of `config.evals`: `run(embed_fns, step) -> metrics`.

  `embed_fns` maps a tower ("query", "gallery", "teacher") to `uint8 images
  -> float32 embeddings`; that is all an evaluator sees of the model.
  `towers` maps each tower the model has to the image size it embeds at,
  so an evaluator loads its images at the size its towers want.
  Subclasses load their data in `__init__` (a missing data set fails before
  training starts) and set `needs_teacher` when they use the teacher tower.
  """

  needs_teacher = False
  # Asked between batches; when it says so the evaluation is abandoned
  # (the train loop sets it: a SIGTERM must not wait for a long evaluation).
  should_stop = None

  def __init__(self, name: str, *, data, task: str, towers: dict, mesh, workdir=None,
               every: int = 0, batch_size: int = 256):
    self.name = name
    self.data, self.task, self.towers = data, task, dict(towers)
    self.mesh, self.workdir = mesh, workdir
    self.every = int(every)
    self.batch_size = int(batch_size)

  def due(self, step: int, total_steps: int) -> bool:
    """Every `every` steps (0: never before the end), and at the last step."""
    return step == total_steps or (self.every > 0 and step % self.every == 0)

  def embed(self, embed_fn, images) -> np.ndarray:
    """float32 [N, D] embeddings of every image, batched over the mesh;
    `EvaluationAbandoned` when `should_stop()` says so between batches."""
    from jaxdml import evaluators, inference  # pylint: disable=g-import-not-at-top
    stop = self.should_stop

    def check():
      if stop is not None and stop():
        raise evaluators.EvaluationAbandoned(f"evaluation {self.name} abandoned")
    return inference.embed_all(embed_fn, images, self.batch_size, self.mesh, between=check)

  def run(self, embed_fns: dict, step: int) -> dict:
    raise NotImplementedError
