"""Device mesh, shardings and multi-host set-up.

One code path from a laptop CPU to a pod: the batch is sharded on mesh axis
`data`; parameters are replicated, or FSDP-sharded over `data` by config.
"""

from __future__ import annotations

import os
import re

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "a launcher started several processes".
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> None:
  """Starts `jax.distributed` when a multi-process launcher set the stage.

  On a TPU pod slice, under SLURM or Open MPI, or with an explicit
  `JAX_COORDINATOR_ADDRESS`, `jax.distributed.initialize()` reads the cluster
  from the environment. A single process needs nothing; setting
  `JAXDML_NO_DISTRIBUTED=1` skips it (e.g. a one-task SLURM debug job).
  """
  if os.environ.get("JAXDML_NO_DISTRIBUTED") == "1":
    return
  if jax.distributed.is_initialized():
    return
  if not _launched_as_cluster():
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def _launched_as_cluster() -> bool:
  return os.environ.get("SLURM_NTASKS", "1") != "1" or any(
      os.environ.get(k) for k in _CLUSTER_ENV if k != "SLURM_NTASKS")


# More host devices replicate the parameters and shrink the per-device batch;
# the gain was measured on 2 cores, so "auto" stops here.
MAX_AUTO_CPU_DEVICES = 8


def auto_cpu_device_count(batch_size: int, cores: int) -> int:
  """Host devices for `--cpu_devices=auto`: the most, up to one per core and
  MAX_AUTO_CPU_DEVICES, that split `batch_size` evenly."""
  limit = max(1, min(cores, MAX_AUTO_CPU_DEVICES))
  return max(d for d in range(1, limit + 1) if batch_size % d == 0)


def use_cpu_cores_as_devices(requested: str, batch_size: int) -> int | None:
  """Splits the CPU into several JAX devices, so a CPU run is data parallel.

  One device per core runs the sharded step of the mesh code path on each
  core, where one device leaves XLA:CPU to spread each op over the cores
  itself. On 2 cores this moved ResNet-50's step from 3.65 to 4.08 img/s and
  ViT-S/16's from 4.32 to 4.79 (docs/benchmarks.md).
  Accelerators are unaffected: the CPU devices are then not in the mesh.

  `requested`: "auto" (see `auto_cpu_device_count`; leaves an explicit
  `--xla_force_host_platform_device_count`, `jax_num_cpu_devices` or a
  multi-process launch alone) or a device count. Must run before JAX starts
  its backends. Returns the count set, or None when left alone.
  """
  if requested == "auto":
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or jax.config.jax_num_cpu_devices >= 0 or _launched_as_cluster()):
      return None
    count = auto_cpu_device_count(batch_size, len(os.sched_getaffinity(0)))
  else:
    try:
      count = int(requested)
    except ValueError:
      count = 0
    if count < 1:
      raise ValueError(f"--cpu_devices={requested!r}: expected 'auto' or a positive integer.")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    if requested == "auto":
      return None
    raise RuntimeError(f"--cpu_devices={requested}: JAX already started with "
                       f"{len(jax.devices('cpu'))} CPU devices; set it before any JAX "
                       "computation (or pass XLA_FLAGS=--xla_force_host_platform_device_count"
                       f"={count}).") from e
  return count


def make_mesh(mesh_config=None, devices=None) -> Mesh:
  """Builds a Mesh from `{"data": -1}`-style config (-1: remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(mesh_config or {DATA_AXIS: -1})
  if DATA_AXIS not in axes:
    raise ValueError(f"config.mesh needs a {DATA_AXIS!r} axis, got {axes}.")
  fixed = int(np.prod([s for s in axes.values() if s != -1]))
  free = [a for a, s in axes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {axes}.")
  if not free and fixed < len(devices) and jax.process_count() == 1:
    devices = devices[:fixed]  # An explicit smaller mesh: the first devices.
  if len(devices) % fixed:
    raise ValueError(
        f"config.mesh {axes} needs a multiple of {fixed} devices; "
        f"{len(devices)} are available.")
  sizes = {a: (len(devices) // fixed if s == -1 else s) for a, s in axes.items()}
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(
        f"config.mesh {axes} uses {int(np.prod(list(sizes.values())))} devices "
        f"but {len(devices)} are available; use -1 for the data axis.")
  grid = np.array(devices).reshape(tuple(sizes.values()))
  return Mesh(grid, tuple(sizes))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over data devices and processes."""
  n_data = mesh.shape[DATA_AXIS]
  if global_batch_size % n_data:
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the {n_data} "
        f"devices on mesh axis '{DATA_AXIS}'; use a multiple of {n_data}, "
        f"e.g. --config.batch_size={max(n_data, global_batch_size // n_data * n_data)}.")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the "
        f"{jax.process_count()} processes.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, n_data: int) -> P:
  """Shards the largest dimension divisible by the data axis size."""
  candidates = [(d, i) for i, d in enumerate(shape) if d % n_data == 0 and d >= n_data]
  if not candidates or int(np.prod(shape)) < 2**14:
    return P()  # Small tensors are cheaper replicated.
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, mode: str = "replicated",
                    rules=()):
  """Shardings for every leaf of the train state.

  `rules` is a sequence of `(regex, spec)`: the first regex that matches a
  leaf's path (`params/encoder/Dense_0/kernel`) gives its PartitionSpec
  (a tuple of axis names or None). Other leaves are replicated, or sharded
  FSDP-style when `mode == "fsdp"` (parameters, their optimizer state and
  the losses' learnable parameters, so a proxy table of 10^5-10^6 classes
  is split over its class axis). The cross-batch memory is replicated: it
  is small next to the encoder and every device needs all of it for pairs.
  """
  if mode not in ("replicated", "fsdp"):
    raise ValueError(f"config.sharding={mode!r}: expected 'replicated' or 'fsdp'.")
  compiled = [(re.compile(r), P(*spec)) for r, spec in rules]
  n_data = mesh.shape[DATA_AXIS]

  def leaf_sharding(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for regex, spec in compiled:
      if regex.search(name):
        return NamedSharding(mesh, spec)
    if mode == "fsdp" and name.startswith(("params/", "opt/", "loss_params/")):
      return NamedSharding(mesh, _fsdp_spec(leaf.shape, n_data))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy batches into global arrays sharded on data."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """Fetches (possibly multi-host, replicated) arrays as numpy."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def as_key(key_data) -> jax.Array:
  """The per-run RNG is stored as raw uint32 key data so it checkpoints plainly."""
  return jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32))
