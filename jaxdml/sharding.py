"""Device mesh, shardings and multi-host set-up.

One code path from a laptop CPU to a pod: the batch is sharded on mesh axis
`data`; parameters are replicated, or FSDP-sharded over `data` by config.

Any mesh works, the config's (Auto axes) or a user's, from `jax.make_mesh`
with its default Explicit axes or with `AxisType.Auto`, inside
`jax.set_mesh` or not:
- `on_any_mesh(fn)`: a function of arrays (the losses through their
  registry, the miners, the memory's functions) run under
  `jax.sharding.auto_axes` when its arrays or the context mesh have
  Explicit axes, results replicated; on Auto axes it is `fn` itself.
- `auto_mesh(mesh)`: the Auto twin of a mesh, what the train step
  (`build.build(config, mesh=...)`), the embed functions and exact search
  run on, with `InContextMesh` making it the context mesh of each call.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import urllib.request

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxdml import host

DATA_AXIS = "data"

def maybe_initialize_distributed() -> None:
  """Starts `jax.distributed` when this process is one of several
  (`distributed_init_args`); a single process needs nothing."""
  if jax.distributed.is_initialized():
    return
  kwargs = distributed_init_args()
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)


def distributed_init_args(environ=None) -> dict | None:
  """What `jax.distributed.initialize` is called with, or None: one process.

  - `JAXDML_NO_DISTRIBUTED=1`: None (e.g. a one-task SLURM debug job).
  - `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`): those.
  - SLURM with several tasks, Open MPI, a multislice (`MEGASCALE_*`) job, a
    TPU slice of more than one host (GKE's `TPU_WORKER_HOSTNAMES`, or a
    gcloud TPU VM, whose hosts only the metadata server lists): no
    arguments, JAX reads the cluster itself. Under SLURM, a task bound to
    one GPU (`srun --gpu-bind=single:1`: CUDA_VISIBLE_DEVICES names one)
    sees it as device 0, where JAX would ask for device SLURM_LOCALID; it
    gets `local_device_ids=[0]`.
  """
  env = os.environ if environ is None else environ
  if env.get("JAXDML_NO_DISTRIBUTED") == "1":
    return None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]))
  if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1:
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"local_device_ids": [0]} if len(visible) == 1 else {}
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  if tpu_slice_hosts(env) > 1:
    return {}
  return None


def _on_cloud_tpu_vm() -> bool:
  """JAX's own finding (at backend start-up) that this is a Cloud TPU VM."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def tpu_slice_hosts(environ=None) -> int:
  """Hosts of the TPU slice this process runs on (1 off TPU). GKE lists
  them in the environment; a gcloud TPU VM only in its metadata server
  (`GCE_METADATA_IP` overrides its address, as for JAX)."""
  env = os.environ if environ is None else environ
  listed = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if listed:
    return len([h for h in listed.split(",") if h.strip()])
  if env.get("TPU_SKIP_MDS_QUERY") is not None or not _on_cloud_tpu_vm():
    return 1
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      endpoints = response.read().decode()
  except OSError as error:
    logging.warning("TPU VM metadata server unreachable (%s): running as one host.", error)
    return 1
  return len([e for e in endpoints.split(",") if e.strip()])


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
        or jax.config.jax_num_cpu_devices >= 0 or distributed_init_args() is not None):
      return None
    count = auto_cpu_device_count(batch_size, host.cores())
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


def _explicit_axes(mesh) -> tuple:
  return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_mesh(leaves):
  """The mesh whose Explicit axes the arrays in `leaves` are typed on, or
  None: the context's (`jax.set_mesh`) when there is one, else the first
  such array's: its abstract mesh under a trace, its concrete `Mesh` when
  it is a concrete array (eager code needs the devices). A context mesh
  without Explicit axes (Auto, or Manual inside shard_map or `auto_axes`)
  is None: nothing to switch."""
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context if _explicit_axes(context) else None
  for leaf in leaves:
    if isinstance(leaf, jax.Array):
      mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
      if mesh is not None and not mesh.empty and _explicit_axes(mesh):
        concrete = getattr(leaf, "sharding", None)  # a tracer has none
        return concrete.mesh if isinstance(concrete, NamedSharding) else mesh
  return None


def on_any_mesh(fn):
  """`fn` (pure, arrays in, arrays out) made to run on arrays sharded over a
  mesh with Explicit axes, as it runs on an Auto mesh.

  Under Explicit axes (`jax.make_mesh`'s default) every op must say how its
  result is sharded, and the pairwise [B, B] label and distance matrices of
  a loss have no such sharding (`eq` of `y[:, None]` and `y[None, :]`, both
  sharded on rows, is a `ShardingTypeError`). So when the arguments or the
  context mesh have Explicit axes, `fn` runs under `jax.sharding.auto_axes`
  over those axes: inside, XLA's partitioner places the intermediates as
  it does on an Auto mesh, and the results come back replicated (`P()`),
  which a scalar loss, a memory and a miner's [B, R] selection are. The
  gradient flows back through `auto_axes` to each input's own sharding.
  On an Auto mesh, one device, or inside an `auto_axes` or `shard_map`,
  `fn` runs as it is. Non-array arguments (hyperparameters) stay Python
  values, so `fn` may branch on them.
  """
  @functools.wraps(fn)
  def run(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    mesh = explicit_mesh(leaves)
    if mesh is None:
      return fn(*args, **kwargs)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

    def body(*arrays):
      full = list(leaves)
      for i, array in zip(where, arrays):
        full[i] = array
      inner_args, inner_kwargs = jax.tree.unflatten(treedef, full)
      return fn(*inner_args, **inner_kwargs)

    context = (jax.set_mesh(mesh) if isinstance(mesh, Mesh)
               else jax.sharding.use_abstract_mesh(mesh))
    with context:
      return jax.sharding.auto_axes(body, axes=_explicit_axes(mesh), out_sharding=P())(
          *(leaves[i] for i in where))
  return run


def auto_mesh(mesh: Mesh) -> Mesh:
  """`mesh` with every axis Auto: the same devices, names and shape.

  The train step, the embedding functions and exact search are whole
  programs whose shardings the library chooses (the batch on `data`, the
  state by `state_shardings`); their model code (reshapes, pooling, top-k)
  leaves the intermediates to XLA's partitioner, which Explicit axes
  (`jax.make_mesh`'s default) forbid. So a user's Explicit mesh is taken
  for its devices and run as this Auto twin, the same program as the
  config's mesh.
  """
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


class InContextMesh:
  """A `jax.jit` function called, traced and lowered with `mesh` as the
  context mesh, whatever the caller's: under a user's
  `jax.set_mesh(explicit_mesh)`, a program on `auto_mesh(explicit_mesh)`
  would otherwise be traced against the wrong mesh. `prepare(*args)`, if
  given, maps the arguments first (`placed`). Other attributes are the
  jitted function's."""

  def __init__(self, mesh: Mesh, jitted, prepare=None):
    self._mesh, self._jitted = mesh, jitted
    self._prepare = prepare or (lambda *args: args)

  def _in_mesh(self, fn, args, kwargs):
    args = self._prepare(*args)
    context = jax.sharding.get_abstract_mesh()
    if context.empty or context == self._mesh.abstract_mesh:
      return fn(*args, **kwargs)  # nothing to replace: as a plain jit call
    with jax.set_mesh(self._mesh):
      return fn(*args, **kwargs)

  def __call__(self, *args, **kwargs):
    return self._in_mesh(self._jitted, args, kwargs)

  def trace(self, *args, **kwargs):
    return self._in_mesh(self._jitted.trace, args, kwargs)

  def lower(self, *args, **kwargs):
    return self._in_mesh(self._jitted.lower, args, kwargs)

  def __getattr__(self, name):
    return getattr(self._jitted, name)


def placed(tree, target: NamedSharding):
  """The arrays of `tree` on `target`, moved only where they are not: a
  batch a user put on the Explicit twin of the mesh is retagged, not
  rejected by the jitted step."""
  return jax.tree.map(
      lambda x: jax.device_put(x, target)
      if isinstance(x, jax.Array) and x.sharding != target else x, tree)


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


def prefetch_to_devices(local_batches, mesh: Mesh, ahead: int = 2):
  """`global_batch` of each batch, made `ahead` batches early.

  The train step is dispatched asynchronously, so while step s runs on the
  devices the loop is already assembling batch s + 1 and starting its
  host-to-device copy; with `ahead` of them in flight the step never waits
  for a copy when the host keeps up. `ahead=0` puts each batch on the
  devices only when it is needed.
  """
  queue = collections.deque()
  for batch in local_batches:
    queue.append(global_batch(batch, mesh))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


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
