"""Ablations on the embedded data: each paper's claim as a small table.

    python -m jaxdml.ablate --study=memory --seeds=3 --workdir=workdirs/ablations

Every variant is a recipe config (`file.py:ARG` plus field overrides) trained
from scratch per seed with `train_and_evaluate`; the table reports the final
evaluation's metric as mean +- std over seeds, and every run's figures go
to `WORKDIR/STUDY.jsonl`. Runs already in that file are not redone, so an
interrupted study resumes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# study -> (metric, [(variant name, config file, arg, overrides)])
STUDIES = {
    "rtl": ("recall@1", [
        ("triplet", "sketchy_rtl.py", "demo,ablation=triplet", {}),
        ("rtl", "sketchy_rtl.py", "demo", {}),
    ]),
    "embedding": ("recall@1", [
        ("l2", "sketchy_rtl.py", "demo,embedding=l2", {}),
        ("bn", "sketchy_rtl.py", "demo", {}),
    ]),
    "memory": ("recall@1", [
        ("no memory", "sop_xbn.py", "demo,adapt=none", {"memory.size": 0}),
        ("XBM", "sop_xbn.py", "demo,adapt=none", {}),
        ("XBN", "sop_xbn.py", "demo,adapt=moments", {}),
        ("XBN kalman", "sop_xbn.py", "demo,adapt=kalman", {}),
    ]),
}

flags.DEFINE_enum("study", None, sorted(STUDIES), "Which claim to test.")
flags.DEFINE_integer("seeds", 3, "Seeds per variant.")
flags.DEFINE_string("workdir", "workdirs/ablations", "Where runs and results go.")
flags.DEFINE_integer("total_steps", None, "Override every variant's total_steps.")


def load_config(file: str, arg: str, seed: int, overrides: dict, total_steps=None):
  from jaxdml import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(ROOT, "configs", file), f"{arg},seed={seed}")
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  if total_steps:
    config.total_steps = total_steps
    config.eval_every = 0
  return config


def run_study(study: str, seeds: int, workdir: str, total_steps=None) -> list[dict]:
  from jaxdml import train  # pylint: disable=g-import-not-at-top
  metric, variants = STUDIES[study]
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, f"{study}.jsonl")
  done = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      for line in f:
        row = json.loads(line)
        done[(row["variant"], row["seed"])] = row
  for name, file, arg, overrides in variants:
    for seed in range(seeds):
      if (name, seed) in done:
        continue
      config = load_config(file, arg, seed, overrides, total_steps)
      run_dir = os.path.join(workdir, study, name.replace(" ", "_"), f"seed{seed}")
      results = train.train_and_evaluate(config, run_dir)
      row = {"variant": name, "seed": seed, "metric": metric, "value": results[metric],
             "results": results}
      done[(name, seed)] = row
      with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
  return [done[(name, seed)] for name, *_ in variants for seed in range(seeds)]


def table(study: str, rows: list[dict]) -> str:
  metric, variants = STUDIES[study]
  lines = [f"| {study} variant | {metric} (mean +- std) | per seed |", "|---|---|---|"]
  for name, *_ in variants:
    values = [100 * r["value"] for r in rows if r["variant"] == name]
    lines.append(f"| {name} | {np.mean(values):.1f} +- {np.std(values):.1f} | "
                 + ", ".join(f"{v:.1f}" for v in values) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  rows = run_study(f.study, f.seeds, f.workdir, f.total_steps)
  print(table(f.study, rows))


if __name__ == "__main__":
  flags.mark_flags_as_required(["study"])
  app.run(main)
