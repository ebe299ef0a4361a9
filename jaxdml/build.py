"""The build layer: everything a run is made of, built once from its config.

    parts = build.build(config)            # mesh, model, teacher, objective, optimizer, state layout
    state = parts.create_state()           # or ckpt.restore(parts.restore_target())
    step = train.make_train_step(parts)    # reads the parts, never the config
    embed = parts.embed_fns(state)         # tower -> (uint8 images -> embeddings)

Training, `jaxdml.bench` and `jaxdml.tools.ablate` (through
`train_and_evaluate`) start here; inference (`--mode=eval`, export, the
image index) restores the model alone (`jaxdml.inference.restore`).
`build` resolves the config (`jaxdml.config.resolve`: defaults filled in,
checked) and reads it once; `Parts.config` keeps the resolved config for
what is written beside the run (config.json, checkpoint metadata).

The train state is one dict pytree: `params`, `batch_stats`, `opt`, `step`,
`rng`, `memory` (cross-batch memory, `{}` when unused), `teacher` (the
teacher kind's own subtree, `{}` when unused) and, only when a loss has
learnable parameters, `loss_params` (by `Objective.learnable` key; the
optimizer then updates `trainable(state)`, params and loss params) and,
only when a loss keeps running state, `loss_state` (by
`Objective.stateful` key; replicated, not trained; the step stores what
the loss returns), so the checkpoints of runs without them restore as
they are. Its
shapes come from `jax.eval_shape(init)`, its shardings from
`jaxdml.sharding`, and `jax.jit(init, out_shardings=...)` creates it
already laid out on the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdml import config as config_lib
from jaxdml import data as data_lib, evaluators, inference, optim, pretrained, sharding, tasks
from jaxdml import teacher as teacher_lib
from jaxdml.inference import build_model, mesh_platform, model_variables
from jaxdml.objective import Objective


@dataclasses.dataclass(frozen=True)
class Loop:
  """The loop's cadence and batch: what the train loop reads besides the parts."""
  total_steps: int
  batch_size: int  # global
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  device_prefetch: int  # batches already on the devices ahead of the step


@dataclasses.dataclass
class Parts:
  """What `build` makes; the train step and loop use these, not the config."""
  config: Any  # the resolved config: written beside the run, read by nothing in the loop
  mesh: jax.sharding.Mesh
  task: str
  model: Any
  teacher: Any  # a jaxdml.teacher.Teacher, or None
  objective: Objective
  tx: Any
  schedule: Callable
  init: Callable  # rng -> fresh train state (jit it with out_shardings)
  abstract: dict  # ShapeDtypeStructs of the state
  shardings: dict
  towers: inference.Towers
  views_lo: int | None  # RAML's on-device views: the student's resolution
  seed: int
  make_initial: Callable  # (state, shardings) -> state with init files and teacher read
  loop: Loop
  train_batches: Callable  # start step -> this process's host batches from there

  def create_state(self) -> dict:
    """A fresh state on the mesh; init files and a frozen teacher read once,
    from then on part of this run's checkpoints."""
    state = jax.jit(self.init, out_shardings=self.shardings)(jax.random.key(self.seed))
    return self.make_initial(state, self.shardings)

  def restore_target(self) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract, self.shardings)

  def tower_fns(self, portable: bool = False) -> dict:
    """Tower -> unjitted `(variables, images) -> embeddings`
    (`jaxdml.inference.Towers.fns`)."""
    return self.towers.fns(portable)

  def embed_fns(self, state) -> dict:
    """Tower -> jitted `images -> embeddings` bound to `state`'s variables,
    batch sharded on the mesh's data axis: what evaluators take."""
    teacher = (None if self.teacher is None
               else self.teacher.variables(state["teacher"]))
    return self.towers.bind(self.mesh, model_variables(state), teacher)

  def make_evaluators(self, workdir=None) -> list:
    """The config's enabled evaluators (`config.evals`), their data loaded."""
    return make_evaluators(self.config, self.towers, self.mesh, workdir)


def make_evaluators(config, towers: inference.Towers, mesh, workdir=None) -> list:
  """The evaluators of a resolved config, for a model with `towers`."""
  return evaluators.build(config.evals, data=config.data, task=config.task,
                          towers=towers.image_sizes, mesh=mesh, workdir=workdir,
                          default_every=int(config.eval_every))


def embedding_dim(model, task: str, image_size: int) -> int:
  """Embedding width, read off the model's output shape (no compute)."""
  inputs = tasks.dummy_inputs(task, image_size)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  out, _ = jax.eval_shape(lambda v: model.apply(v, *inputs), variables)
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


def _init_fn(task, image_size, objective, model, teacher, tx, num_classes):
  def init(rng):
    params_rng, run_rng = jax.random.split(rng)
    inputs = tasks.dummy_inputs(task, image_size)
    variables = model.init(params_rng, *inputs, train=False)
    needs_dim = objective.learnable or objective.uses_memory
    dim = embedding_dim(model, task, image_size) if needs_dim else 0
    state = {
        "params": variables["params"],
        "batch_stats": variables.get("batch_stats", {}),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(run_rng),
        "memory": objective.init_memory(dim),
        "teacher": {},
    }
    if objective.learnable:
      # Derived, not split off `rng`: runs without loss parameters keep the
      # parameter and run keys (and so the initial weights) they always had.
      state["loss_params"] = objective.init_loss_params(
          jax.random.fold_in(run_rng, 1), num_classes=num_classes, dim=dim)
    if objective.stateful:
      state["loss_state"] = objective.init_loss_state()
    state["opt"] = tx.init(trainable(state))
    if teacher is not None:
      state["teacher"] = teacher.init(model_variables(state),
                                      tasks.dummy_inputs(task, teacher.image_size()))
    return state
  return init


def _initial_state_fn(model_config, seed, teacher):
  """`(fresh state, shardings) -> state` with the encoders' init files and
  the teacher's own weights read in (host side, once)."""
  def make_initial(state, shardings):
    if pretrained.init_files(model_config):
      state = pretrained.load_into(model_config, seed, state, shardings)
    if teacher is not None:
      state["teacher"] = teacher.restore(state["teacher"], model_variables(state),
                                         shardings["teacher"])
    return state
  return make_initial


def teacher_image_size(config) -> int:
  """What the teacher sees: RAML's high-resolution views, or the student's images."""
  if config.teacher.get("images") == "image_hi":
    return int(config.data.views["hi"])
  return int(config.data.image_size)


def build(config, *, devices=None, mesh=None) -> Parts:
  """Resolves `config` (`jaxdml.config.resolve`: defaults filled in,
  validated) and builds its parts once; `devices` (default all) or `mesh`
  overrides the mesh the config asks for. `mesh` may be any mesh with a
  `data` axis, `jax.make_mesh`'s Explicit axes too: the parts run on its
  Auto twin (`sharding.auto_mesh`, `Parts.mesh`), so the step is the
  config's own program on those devices."""
  config = config_lib.resolve(config)
  if mesh is None:
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  mesh = sharding.auto_mesh(mesh)  # a user's Explicit mesh: its devices, as config's
  model = build_model(config.model, mesh_platform(mesh))
  image_size = int(config.data.image_size)
  teacher = None
  if teacher_lib.uses_teacher(config):
    teacher = teacher_lib.build(config.teacher, model, image_size=teacher_image_size(config),
                                epoch_steps=int(config.epoch_steps))
  objective = Objective.from_config(config)
  tx, schedule = optim.make_optimizer(config.optimizer, int(config.total_steps))
  num_classes = (data_lib.num_classes(config.data, task=config.task)
                 if objective.learnable else 0)
  init = _init_fn(config.task, image_size, objective, model, teacher, tx, num_classes)
  abstract = jax.eval_shape(init, jax.random.key(int(config.seed)))
  rules = tuple(config_lib.as_dict(config.get("sharding_rules")).items())
  shardings = sharding.state_shardings(abstract, mesh, config.sharding, rules=rules)
  towers = inference.Towers.of(
      config.task, model, image_size, model_config=config.model,
      teacher_model=None if teacher is None else teacher.model,
      teacher_image_size=None if teacher is None else teacher.image_size())
  views = config.data.get("views")
  loop = Loop(total_steps=int(config.total_steps), batch_size=int(config.batch_size),
              log_every=int(config.log_every), checkpoint_every=int(config.checkpoint_every),
              keep_checkpoints=int(config.keep_checkpoints),
              device_prefetch=int(config.data.get("device_prefetch") or 2))
  return Parts(config=config, mesh=mesh, task=config.task, model=model, teacher=teacher,
               objective=objective, tx=tx, schedule=schedule, init=init, abstract=abstract,
               shardings=shardings, towers=towers,
               views_lo=int(views.get("lo") or image_size) if views else None,
               seed=int(config.seed),
               make_initial=_initial_state_fn(config.model, int(config.seed), teacher),
               loop=loop, train_batches=_batches_fn(config))


def _batches_fn(config) -> Callable:
  """`start_step -> this process's share of the global batches from there`."""
  data, seed, batch_size, task = config.data, int(config.seed), int(config.batch_size), config.task

  def train_batches(start_step: int):
    return data_lib.train_batches(data, seed=seed, global_batch_size=batch_size,
                                  start_step=start_step, process_index=jax.process_index(),
                                  process_count=jax.process_count(), task=task)
  return train_batches
