r"""Images/s per core from one core to all: jaxdml's workers beside the host's ceiling.

  python benchmarks/core_scaling.py --root=/tmp/jaxdml_jpegs --cores=1,2 --rounds=12
  python benchmarks/core_scaling.py --recipe=sop_xbn.py --cores=1,8,32,96   # a large host

For each core count n, in rounds whose order turns every round:
- `workers`: the recipe's training pipeline with n one-thread worker
  processes (`data.num_workers=n`), as a training process runs it, timed by
  `bench.bench_input`;
- `independent`: n processes that share nothing, each running the same
  pipeline in one thread of its own (`num_workers=0`, `num_threads=1`, a
  seed each), their timed windows started together by a barrier.
Independent processes are as flat per core as this host allows: they leave
out all that workers share (the training process, the step counter)
and keep what the hardware shares (memory bandwidth, caches, clocks).
Prints one JSON line per run, then per kind and n the median over rounds
of images/s per core against one independent process in the same round,
and of workers over independent processes at the same n.
The files, and the flags --root, --num_images, --batch_size and --steps
(timed batches per process and run), are `input_pipeline.py`'s.
"""
import json
import multiprocessing
import os
import queue
import sys

from absl import app, flags
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script, benchmarks/ alone is on the path
from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxdml import host  # pylint: disable=g-import-not-at-top,wrong-import-position

# --root, --num_images, --batch_size and --steps are input_pipeline.py's flags.
FLAGS = flags.FLAGS
_RECIPE = flags.DEFINE_string("recipe", "cub_irt.py", "Recipe under configs/.")
_CORES = flags.DEFINE_list("cores", None,
                           "Core counts to time (default: 1 and all this process may use).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Rounds; medians are over them.")
KINDS = ("workers", "independent")


def _time_one(recipe, data_dir, workers, seed, batch, steps, barrier, results):
  """One process: the recipe's pipeline (`workers` one-thread worker
  processes, or none: one thread here), its record on `results`."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxdml.tools import bench  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(_REPO, "configs", recipe))
  config.seed = seed
  config.data.data_dir = data_dir
  config.data.num_workers, config.data.num_threads = workers, 1
  try:
    # Every worker's first batch comes after its start: warm up past them.
    results.put(bench.bench_input(config, batch, steps, warmup=2 * workers + 2,
                                  before_timing=barrier.wait))
  except BaseException:
    barrier.abort()  # the others stop waiting for this one
    raise


def run_kind(kind, n, recipe, data_dir, batch, steps) -> dict:
  """`kind` ("workers" or "independent") at `n` cores: images/s in all and
  CPU seconds per image (workers' included)."""
  context = multiprocessing.get_context("spawn")
  processes = 1 if kind == "workers" else n
  barrier, results = context.Barrier(processes), context.Queue()
  args = [(recipe, data_dir, n if kind == "workers" else 0, i, batch, steps, barrier, results)
          for i in range(processes)]
  children = [context.Process(target=_time_one, args=a) for a in args]
  for child in children:
    child.start()
  records = []
  while len(records) < len(children):
    try:
      records.append(results.get(timeout=1))
    except queue.Empty:
      failed = [c.exitcode for c in children if c.exitcode]
      if failed:
        for child in children:
          child.terminate()
        raise RuntimeError(f"a timed process of {kind} x{n} exited with {failed[0]} "
                           "(its traceback is above).") from None
  for child in children:
    child.join()
  images = sum(r["images_per_sec"] * r["seconds"] for r in records)
  cpu = sum(r["cpu_seconds_per_image"] * r["images_per_sec"] * r["seconds"] for r in records)
  out = {"kind": kind, "cores": n, "images_per_sec": sum(r["images_per_sec"] for r in records),
         "cpu_seconds_per_image": cpu / images}
  if kind == "workers":
    out["worker_busy"] = records[0].get("worker_busy")
  return out


def summary(rounds, cores) -> dict:
  """Medians over `rounds` (each `{(kind, n): images/s}`): per core against
  one independent process of the same round, and workers over independent."""
  out = {}
  for n in cores:
    for kind in KINDS:
      out[f"{kind} x{n} per core"] = float(np.median(
          [r[(kind, n)] / n / r[("independent", 1)] for r in rounds]))
    out[f"workers/independent x{n}"] = float(np.median(
        [r[("workers", n)] / r[("independent", n)] for r in rounds]))
  return {k: round(v, 3) for k, v in out.items()}


def main(argv):
  del argv
  cores = sorted({1, *(int(c) for c in _CORES.value or [host.cores()])})
  data_dir = input_pipeline.prepare_for(FLAGS.root, [_RECIPE.value], FLAGS.num_images)
  runs = [(kind, n) for n in cores for kind in KINDS]
  rounds = []
  for r in range(_ROUNDS.value):
    rates = {}
    for kind, n in runs if r % 2 == 0 else runs[::-1]:
      record = run_kind(kind, n, _RECIPE.value, data_dir, FLAGS.batch_size, FLAGS.steps)
      rates[(kind, n)] = record["images_per_sec"]
      print(json.dumps({"round": r, **record}), flush=True)
    rounds.append(rates)
  print(json.dumps({"recipe": _RECIPE.value, "rounds": len(rounds), **summary(rounds, cores)}))


if __name__ == "__main__":
  FLAGS.set_default("steps", 150)  # here, not at import: a test's import leaves it alone
  app.run(main)
