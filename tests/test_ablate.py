"""The ablation runner: teachers first, shared runs, resumable results."""

import json
import os
import subprocess
import sys

import pytest

from jaxdml import train
from jaxdml.tools import ablate
from test_train import ROOT

CONFIGS = os.path.join(ROOT, "configs")

SPEC = (("recall@1",), [
    ablate.Variant("teacher", "cub_raml_teacher.py:smoke"),
    ablate.Variant("sym", "cub_raml.py:smoke", from_runs={"teacher.workdir": "teacher"},
                   run="student"),
    ablate.Variant("asym", "cub_raml.py:smoke", from_runs={"teacher.workdir": "teacher"},
                   run="student", metric_prefix="asym/"),
], 1)


@pytest.mark.slow  # two trainings, ~75 s: slow, to keep CI near 15 minutes.
def test_study_trains_the_teacher_first_shares_runs_and_resumes(tmp_path, monkeypatch):
  results = ablate.run_study("t", SPEC, 1, str(tmp_path), configs_dir=CONFIGS)
  assert set(results) == {("teacher", 0), ("student", 0)}
  rows = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
  assert [r["run"] for r in rows] == ["teacher", "student"]
  lines = ablate.table("t", SPEC, results, 1).splitlines()
  student = results[("student", 0)]
  assert f"| sym | {100 * student['recall@1']:.1f} +- 0.0 |" in lines[3]
  assert f"| asym | {100 * student['asym/recall@1']:.1f} +- 0.0 |" in lines[4]
  # A rerun reads the results file and trains nothing.
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("retrained"))
  assert ablate.run_study("t", SPEC, 1, str(tmp_path), configs_dir=CONFIGS) == results


@pytest.mark.slow
def test_ablate_runs_from_an_installed_package(tmp_path):
  """No checkout paths inside the package: a non-editable install runs any
  studies file against any recipe directory."""
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(site), ROOT], check=True, timeout=900)
  studies = tmp_path / "studies.py"
  studies.write_text("from jaxdml.ablate import Variant\n"
                     "STUDIES = {'one': (('recall@1',), [Variant('ms', 'cub_obdsd.py:smoke,"
                     "distill=False')], 1)}\n")
  env = dict(os.environ, PYTHONPATH=str(site))
  where = subprocess.run([sys.executable, "-c", "import jaxdml; print(jaxdml.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(site))
  run = subprocess.run(
      [sys.executable, "-m", "jaxdml.ablate", "--study=one", "--seeds=1",
       f"--studies={studies}", f"--configs={os.path.join(ROOT, 'configs')}",
       f"--workdir={tmp_path / 'work'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| ms |" in run.stdout
