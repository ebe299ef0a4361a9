"""The ablation runner: studies of recipe variants as tables over seeds.

    python -m jaxdml.tools.ablate --study=memory --seeds=3 --workdir=workdirs/ablations
    python -m jaxdml.tools.ablate --study=all     # every study, one table each (make ablations)
    python -m jaxdml.tools.ablate --studies=my_studies.py --configs=/path/to/configs --study=mine

The studies themselves (`STUDIES = {name: (metrics, [Variant, ...],
total_steps or None)}`) are data, not library: `--studies` names the file
(default `benchmarks/ablation_studies.py`, docs/ablations.md's tables) and
`--configs` the recipe directory its variants name (default `configs`),
both relative to the working directory, so an installed jaxdml runs a
checkout's studies or anyone's own.

Every variant is a recipe config (`file.py:ARG` plus field overrides) trained
from scratch per seed with `train_and_evaluate`; the table reports the final
evaluation's metrics as mean +- std over seeds, and every run's figures go
to `WORKDIR/STUDY.jsonl`. Runs already in that file are not redone, so an
interrupted study resumes. A variant may build on another variant's run of
the same seed (`from_runs`: its workdir fills a config field, e.g. the
frozen teacher or the weights to fine-tune), or read another metric of a
run it shares (`run`), as RAML's asymmetric and symmetric protocols do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from absl import app, flags
import numpy as np



@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  config: str  # "file.py:ARG" under configs/
  overrides: dict = dataclasses.field(default_factory=dict)
  # config field -> variant whose run (same seed) it names, e.g.
  # {"teacher.workdir": "teacher"}; that variant runs first.
  from_runs: dict = dataclasses.field(default_factory=dict)
  run: str | None = None  # share another variant's run (default: its own)
  metric_prefix: str = ""  # e.g. "asym/": read "asym/recall@1" for "recall@1"

  @property
  def run_name(self) -> str:
    return (self.run or self.name).replace(" ", "_")


def define_flags():
  """Flags, defined only when run as a program: a studies file imports this
  module (for Variant) while `python -m jaxdml.tools.ablate` runs it as __main__."""
  flags.DEFINE_string("study", None, "Which study of the studies file to run, or 'all'.")
  flags.DEFINE_string("studies", "benchmarks/ablation_studies.py",
                      "Python file defining STUDIES (name -> (metrics, variants, total_steps)).")
  flags.DEFINE_string("configs", "configs", "Directory of the recipe files variants name.")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant.")
  flags.DEFINE_string("workdir", "workdirs/ablations", "Where runs and results go.")
  flags.DEFINE_integer("total_steps", None, "Override every variant's total_steps.")


def load_studies(path: str) -> dict:
  """The `STUDIES` dict of a studies file."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"--studies={path!r} does not exist: run from a jaxdml checkout (it has "
        "benchmarks/ablation_studies.py) or pass --studies=FILE defining STUDIES.")
  spec = importlib.util.spec_from_file_location("jaxdml_ablation_studies", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.STUDIES


def load_config(variant: Variant, seed: int, configs_dir: str, total_steps=None):
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  file, _, arg = variant.config.partition(":")
  path = os.path.join(configs_dir, file)
  if not os.path.exists(path):
    raise FileNotFoundError(f"variant {variant.name!r}: no recipe {path!r}; pass "
                            "--configs=DIR, the directory of the recipe files.")
  config = config_lib.load_config(path, f"{arg},seed={seed}" if arg else f"seed={seed}")
  for path, value in variant.overrides.items():
    _set(config, path, value)
  if total_steps:
    config.total_steps = total_steps
    config.eval_every = 0
  return config


def _set(config, path: str, value) -> None:
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _read_done(path: str) -> dict:
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        done[(row["run"], row["seed"])] = row
  return done


def run_study(study: str, spec, seeds: int, workdir: str, *, configs_dir: str = "configs",
              total_steps=None) -> dict:
  """Trains what is missing of `spec` (metrics, variants, total_steps);
  returns `{(run name, seed): results}`."""
  from jaxdml import train  # pylint: disable=g-import-not-at-top
  _, variants, default_steps = spec
  total_steps = total_steps or default_steps
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, f"{study}.jsonl")
  done = _read_done(results_path)
  by_name = {v.name: v for v in variants}
  run_dir = lambda v, seed: os.path.join(workdir, study, v.run_name, f"seed{seed}")
  for seed in range(seeds):
    for v in variants:
      if (v.run_name, seed) in done:
        continue
      config = load_config(v, seed, configs_dir, total_steps)
      for field, source in v.from_runs.items():
        _set(config, field, run_dir(by_name[source], seed))
      results = train.train_and_evaluate(config, run_dir(v, seed))
      row = {"run": v.run_name, "seed": seed, "config": v.config, "results": results}
      done[(v.run_name, seed)] = row
      with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
  return {key: row["results"] for key, row in done.items()}


def table(study: str, spec, results: dict, seeds: int) -> str:
  metrics, variants, _ = spec
  lines = [f"| {study} variant | " + " | ".join(f"{m} (mean +- std)" for m in metrics)
           + " | per seed |", "|---" * (len(metrics) + 2) + "|"]
  scale = lambda m: 1.0 if m == "nn_distance" else 100.0
  for v in variants:
    cells, per_seed = [], []
    for m in metrics:
      values = [scale(m) * results[(v.run_name, s)][v.metric_prefix + m] for s in range(seeds)
                if (v.run_name, s) in results]
      cells.append(f"{np.mean(values):.{3 if scale(m) == 1 else 1}f} +- "
                   f"{np.std(values):.{3 if scale(m) == 1 else 1}f}")
      if m == metrics[0]:
        per_seed = values
    lines.append(f"| {v.name} | " + " | ".join(cells) + " | "
                 + ", ".join(f"{x:.{3 if scale(metrics[0]) == 1 else 1}f}" for x in per_seed)
                 + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  studies = load_studies(f.studies)
  if f.study != "all" and f.study not in studies:
    raise app.UsageError(f"--study={f.study}: {f.studies} defines {sorted(studies)} (or 'all').")
  for study in sorted(studies) if f.study == "all" else [f.study]:
    results = run_study(study, studies[study], f.seeds, f.workdir, configs_dir=f.configs,
                        total_steps=f.total_steps)
    print(table(study, studies[study], results, f.seeds), flush=True)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["study"])
  app.run(main)
