"""One build layer: everything a run is made of, built once from its config.

    parts = build.build(config)            # mesh, model, teacher, optimizer, state layout
    state = parts.create_state()           # or ckpt.restore(parts.restore_target())
    embed = parts.embed_fns(state)         # tower -> (uint8 images -> embeddings)

Training, `--mode=eval`, `--mode=export`, `jaxdml.bench` and `jaxdml.ablate`
all start here, so there is one copy of the set-up and one embed function
per tower (`tasks.towers` says which model method each tower is).

The train state is one dict pytree: `params`, `batch_stats`, `opt`, `step`,
`rng`, `memory` (cross-batch memory, `{}` when unused), `teacher` (the
teacher kind's own subtree, `{}` when unused) and, only when a loss has
learnable parameters, `loss_params` (by `tasks.learnable` key; the
optimizer then updates `trainable(state)`, params and loss params). Its shapes come from
`jax.eval_shape(init)`, its shardings from `jaxdml.sharding`, and
`jax.jit(init, out_shardings=...)` creates it already laid out on the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdml import config_lib, data as data_lib, losses, models, optim, pretrained, sharding
from jaxdml import tasks
from jaxdml import teacher as teacher_lib


def build_model(model_config, platform: str | None = None):
  """The encoder of a `config.model` (`name` plus constructor keywords);
  `dtype="auto"` resolved for `platform` (default: JAX's default backend)."""
  kwargs = pretrained.model_kwargs(model_config)
  return models.get(kwargs.pop("name"), platform=platform, **kwargs)


def mesh_platform(mesh) -> str:
  """"cpu", "gpu" or "tpu": what the mesh's devices are."""
  return mesh.devices.flat[0].platform


def model_variables(state: dict) -> dict:
  """The Flax variables of the train state's model (no empty batch_stats)."""
  variables = {"params": state["params"]}
  if jax.tree.leaves(state["batch_stats"]):
    variables["batch_stats"] = state["batch_stats"]
  return variables


def embed_fn(model, method=None) -> Callable:
  """`(variables, images in [0, 255]) -> float32 embeddings` of one tower."""
  def embed(variables, images):
    out, _ = model.apply(variables, data_lib.normalize(images), train=False, method=method)
    return out.astype(jnp.float32)
  return embed


@dataclasses.dataclass
class Parts:
  """What `build` makes; see the module docstring."""
  config: Any
  mesh: jax.sharding.Mesh
  model: Any
  teacher: teacher_lib.Teacher | None
  tx: Any
  schedule: Callable
  init: Callable  # rng -> fresh train state (jit it with out_shardings)
  abstract: dict  # ShapeDtypeStructs of the state
  shardings: dict

  def create_state(self) -> dict:
    """A fresh state on the mesh; init files and a frozen teacher read once,
    from then on part of this run's checkpoints."""
    state = jax.jit(self.init, out_shardings=self.shardings)(jax.random.key(int(self.config.seed)))
    if pretrained.init_files(self.config.model):
      state = pretrained.load_into(self.config, state, self.shardings)
    if self.teacher is not None:
      state["teacher"] = self.teacher.restore(state["teacher"], model_variables(state),
                                              self.shardings["teacher"])
    return state

  def restore_target(self) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)

  def tower_fns(self, portable: bool = False) -> dict:
    """Tower -> unjitted `(variables, images) -> embeddings`; with a teacher
    also `"teacher"` (its model on its own variables).

    These run the model built for the mesh's platform. `portable=True` (what
    export lowers for cpu, cuda and tpu at once) resolves `dtype="auto"` per
    platform at lowering time instead: float32 in the CPU lowering, bfloat16
    in the GPU and TPU ones (the parameters are float32 either way).
    """
    towers = tasks.towers(self.config.task)
    fns = {t: embed_fn(self.model, m) for t, m in towers.items()}
    if portable:
      on_cpu, on_accelerator = (build_model(self.config.model, p) for p in ("cpu", "tpu"))
      if models.dtype_of(on_cpu) != models.dtype_of(on_accelerator):
        fns = {t: functools.partial(models.layers.on_cpu_else, embed_fn(on_cpu, m),
                                    embed_fn(on_accelerator, m))
               for t, m in towers.items()}
    if self.teacher is not None:
      fns["teacher"] = embed_fn(self.teacher.model)
    return fns

  @functools.cached_property
  def _jitted_towers(self) -> dict:
    # Jitted once per run: every evaluation reuses the compiled functions.
    return {tower: jax.jit(fn, in_shardings=(sharding.replicated(self.mesh),
                                             sharding.batch_sharding(self.mesh)),
                           out_shardings=sharding.replicated(self.mesh))
            for tower, fn in self.tower_fns().items()}

  def embed_fns(self, state) -> dict:
    """Tower -> jitted `images -> embeddings` bound to `state`'s variables,
    batch sharded on the mesh's data axis: what evaluators take."""
    bound = {}
    for tower, jitted in self._jitted_towers.items():
      variables = (self.teacher.variables(state["teacher"]) if tower == "teacher"
                   else model_variables(state))
      bound[tower] = functools.partial(jitted, variables)
    return bound


def dummy_inputs(config, size: int | None = None) -> tuple:
  """One fake image per model input, for `model.init`."""
  size = int(size or config.data.image_size)
  image = jnp.zeros((1, size, size, 3), jnp.uint8)
  return tasks.model_inputs(config.task, {"sketch": image, "photo": image, "image": image})


def embedding_dim(model, config) -> int:
  """Embedding width, read off the model's output shape (no compute)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config)))
  out, _ = jax.eval_shape(lambda v: model.apply(v, *dummy_inputs(config)), variables)
  out = out["gallery"] if isinstance(out, dict) else out
  return int(out.shape[-1])


def trainable(state: dict):
  """What the optimizer updates: the encoder's params, with the losses'
  learnable parameters beside them when the config has any (only then, so
  states without them keep their layout)."""
  if "loss_params" in state:
    return {"params": state["params"], "loss_params": state["loss_params"]}
  return state["params"]


def with_trainable(state: dict, tree) -> dict:
  """`state` with `trainable(state)` replaced by `tree`."""
  if "loss_params" in state:
    return dict(state, params=tree["params"], loss_params=tree["loss_params"])
  return dict(state, params=tree)


def _init_fn(config, model, teacher, tx):
  learnable = tasks.learnable(config)
  num_classes = (data_lib.num_classes(config.data, task=config.task) if learnable else 0)

  def init(rng):
    params_rng, run_rng = jax.random.split(rng)
    variables = model.init(params_rng, *dummy_inputs(config), train=False)
    dim = embedding_dim(model, config) if learnable or tasks.uses_memory(config) else 0
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(run_rng),
        "memory": tasks.init_memory(config, dim),
        "teacher": {},
    }
    if learnable:
      # Derived, not split off `rng`: runs without loss parameters keep the
      # parameter and run keys (and so the initial weights) they always had.
      keys = jax.random.split(jax.random.fold_in(run_rng, 1), len(learnable))
      state["loss_params"] = {
          key: losses.init_params(name, k, num_classes=num_classes, dim=dim, **hparams)
          for (key, name, hparams), k in zip(learnable, keys)}
    state["opt"] = tx.init(trainable(state))
    if teacher is not None:
      state["teacher"] = teacher.init(model_variables(state),
                                      dummy_inputs(config, teacher.image_size()))
    return state
  return init


def build(config, *, devices=None, mesh=None) -> Parts:
  """Resolves `config` (`config_lib.resolve`: defaults filled in, validated)
  and builds its parts once; `devices` (default all) or `mesh` overrides the
  mesh the config asks for. `Parts.config` is the resolved config."""
  config = config_lib.resolve(config)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  model = build_model(config.model, mesh_platform(mesh))
  teacher = teacher_lib.build(config, model)
  tx, schedule = optim.make_optimizer(config.optimizer, int(config.total_steps))
  init = _init_fn(config, model, teacher, tx)
  abstract = jax.eval_shape(init, jax.random.key(int(config.seed)))
  rules = tuple(dict(config.get("sharding_rules", None) or {}).items())
  shardings = sharding.state_shardings(abstract, mesh, config.sharding, rules=rules)
  return Parts(config=config, mesh=mesh, model=model, teacher=teacher, tx=tx,
               schedule=schedule, init=init, abstract=abstract, shardings=shardings)
