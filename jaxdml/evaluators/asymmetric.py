"""The `asymmetric` evaluator: RAML's protocol (Suma & Tolias 2023).

The student's queries (query tower, at the student's image size) against a
database the teacher tower embeds at its own image size (RAML's 448 px
teacher); reported under `asym/`. On a same-set data set (CUB, Cars, SOP)
the database is the query set itself, leave-one-out, as the teacher sees
it. Everything else is the `retrieval` evaluator's.
"""

from __future__ import annotations

from jaxdml.config import defaults
from jaxdml.evaluators.retrieval import Retrieval


class Asymmetric(Retrieval):
  """Student queries, teacher database."""

  SETTINGS = defaults.EVALUATOR_TYPES["asymmetric"]
  needs_teacher = True
  gallery_tower = "teacher"

  def __init__(self, name, *, towers, task, teacher_sets=None, **kwargs):
    """`teacher_sets`: the sets at the teacher's size, instead of loading them."""
    if "teacher" not in towers or task != "single":
      raise ValueError("the asymmetric evaluation protocol needs a single-encoder recipe "
                       "with a config.teacher (the database is the teacher's).")
    super().__init__(name, towers=towers, task=task, **kwargs)
    hi = teacher_sets or self.load(self.towers["teacher"])
    self.teacher_gallery = hi["query"] if self.same_set else hi["gallery"]

  def gallery_set(self) -> dict:
    return self.teacher_gallery
