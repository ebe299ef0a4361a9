"""The ablation runner: teachers first, shared runs, resumable results."""

import json

import pytest

from jaxdml import ablate, train

SPEC = (("recall@1",), [
    ablate.Variant("teacher", "cub_raml_teacher.py:smoke"),
    ablate.Variant("sym", "cub_raml.py:smoke", from_runs={"teacher.workdir": "teacher"},
                   run="student"),
    ablate.Variant("asym", "cub_raml.py:smoke", from_runs={"teacher.workdir": "teacher"},
                   run="student", metric_prefix="asym/"),
], 1)


def test_study_trains_the_teacher_first_shares_runs_and_resumes(tmp_path, monkeypatch):
  results = ablate.run_study("t", 1, str(tmp_path), spec=SPEC)
  assert set(results) == {("teacher", 0), ("student", 0)}
  rows = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
  assert [r["run"] for r in rows] == ["teacher", "student"]
  lines = ablate.table("t", results, 1, spec=SPEC).splitlines()
  student = results[("student", 0)]
  assert f"| sym | {100 * student['recall@1']:.1f} +- 0.0 |" in lines[3]
  assert f"| asym | {100 * student['asym/recall@1']:.1f} +- 0.0 |" in lines[4]
  # A rerun reads the results file and trains nothing.
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("retrained"))
  assert ablate.run_study("t", 1, str(tmp_path), spec=SPEC) == results
