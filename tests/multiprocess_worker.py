"""One process of `tests/test_multiprocess.py`, started by the test with
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` and
4 fake CPU devices in its environment.

    python tests/multiprocess_worker.py train WORKDIR STOP_AFTER
        trains the smoke config (`mp_config()`) for STOP_AFTER steps, as
        `python -m jaxdml.main` would (sharding.maybe_initialize_distributed
        runs inside train.setup).
    python tests/multiprocess_worker.py long WORKDIR
        trains the same config for up to 200 steps, every step logged, no
        evaluation: long enough to be sent SIGTERM mid-run.
    python tests/multiprocess_worker.py scann WORKDIR
        searches a fixed gallery with the ScaNN backend on both processes,
        counting the index builds, into WORKDIR/scann_<process>.json.
    python tests/multiprocess_worker.py batch WORKDIR
        assembles a global batch from per-process rows and writes what the
        jitted computation saw to WORKDIR/batch_<process>.json.
"""

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def mp_config():
  """The smoke SBIR config, 4 steps, checkpoints and evaluations at 3 and 4."""
  spec = importlib.util.spec_from_file_location(
      "sketchy_rtl", os.path.join(ROOT, "configs", "sketchy_rtl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.total_steps = 4
  config.checkpoint_every = 3
  config.eval_every = 3
  return config


def train(workdir, stop_after):
  from jaxdml import train as train_lib  # pylint: disable=g-import-not-at-top
  forbid_hidden_gathers()
  train_lib.train_and_evaluate(mp_config(), workdir, stop_after=int(stop_after))


def forbid_hidden_gathers():
  """`jax.device_put` of a host value onto devices of several processes makes
  JAX compare the value across processes (an all-gather of all of it): a
  gallery put that way is gathered whole, per query block too. Fail on it."""
  import jax  # pylint: disable=g-import-not-at-top
  put = jax.device_put

  def checked(x, device=None, **kw):
    leaves = jax.tree.leaves(x)
    if isinstance(device, jax.sharding.Sharding):
      places = [device] * len(leaves)
    else:  # None, a device, or one sharding per leaf
      places = jax.tree.leaves(device, is_leaf=lambda d: isinstance(d, jax.sharding.Sharding))
    for leaf, place in zip(leaves, places):
      if (isinstance(place, jax.sharding.Sharding) and not place.is_fully_addressable
          and not isinstance(leaf, jax.Array)):
        raise AssertionError(f"jax.device_put of a host {type(leaf).__name__} "
                             f"{getattr(leaf, 'shape', '')} onto {place}: a hidden gather")
    return put(x, device, **kw)

  jax.device_put = checked


def long(workdir):
  from jaxdml import train as train_lib  # pylint: disable=g-import-not-at-top
  config = mp_config()
  config.total_steps = 200
  config.checkpoint_every = 1000
  config.log_every = 1
  config.evals.retrieval.enabled = False
  train_lib.train_and_evaluate(config, workdir)


def scann(workdir):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxdml import retrieval, sharding  # pylint: disable=g-import-not-at-top
  from jaxdml.retrieval import scann_backend  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  builds = []
  build = scann_backend.build_searcher
  scann_backend.build_searcher = lambda *a, **kw: builds.append(1) or build(*a, **kw)
  gallery, query = scann_gallery_and_query()
  scores, indices = retrieval.search(query, gallery, 5, backend="scann")
  with open(os.path.join(workdir, f"scann_{jax.process_index()}.json"), "w") as f:
    json.dump({"builds": len(builds), "indices": np.asarray(indices).tolist(),
               "scores": np.asarray(scores).tolist()}, f)


def scann_gallery_and_query():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)


def batch(workdir):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxdml import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh()
  # Process p holds global rows 4p .. 4p+3, as the data pipeline hands them out.
  rows = 8 // jax.process_count()
  local = {"x": np.arange(rows * jax.process_index(), rows * (jax.process_index() + 1),
                          dtype=np.float32)}
  x = sharding.global_batch(local, mesh)["x"]
  total = jax.jit(lambda v: (v * np.arange(1, 9, dtype=np.float32)).sum(),
                  out_shardings=sharding.replicated(mesh))(x)
  result = {"process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "global_shape": list(x.shape),
            "weighted_sum": float(sharding.to_host(total)),
            "gathered": sharding.to_host(x).tolist()}
  with open(os.path.join(workdir, f"batch_{jax.process_index()}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  {"train": train, "long": long, "scann": scann, "batch": batch}[sys.argv[1]](*sys.argv[2:])
