"""A model as embed functions, and the one way to restore a run for inference.

    model = inference.restore("workdirs/demo")          # its latest checkpoint
    fns = model.embed_fns()                             # tower -> uint8 images -> embeddings
    embeddings = inference.embed_all(fns["gallery"], images, 256, model.mesh)

A model has towers: `query` and `gallery` (SBIR's sketch and photo
encoders; one encoder serves both otherwise) and, for a run with a
teacher, `teacher` (its model on its own variables, at its own image
size). `Towers` turns a model into those functions, for the train loop's
evaluation (on the live state, `jaxdml.build.Parts`) as for a restored run.

`restore` is what `--mode=eval`, `--mode=export` and the image index use:
it reads the model's variables from the run's checkpoint and builds
neither the optimizer nor the teacher object, so a distilled student
evaluates, exports and indexes after its teacher's workdir is gone (the
teacher's architecture is recorded in the student's checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdml import data as data_lib
from jaxdml import models, paths, pretrained, sharding, tasks


def build_model(model_config, platform: str | None = None):
  """The encoder of a `config.model` (`name` plus constructor keywords);
  `dtype="auto"` resolved for `platform` (default: JAX's default backend)."""
  kwargs = pretrained.model_kwargs(model_config)
  return models.get(kwargs.pop("name"), platform=platform, **kwargs)


def mesh_platform(mesh) -> str:
  """"cpu", "gpu" or "tpu": what the mesh's devices are."""
  return mesh.devices.flat[0].platform


def embed_fn(model, method=None) -> Callable:
  """`(variables, images in [0, 255]) -> float32 embeddings` of one tower."""
  def embed(variables, images):
    out, _ = model.apply(variables, data_lib.normalize(images), train=False, method=method)
    return out.astype(jnp.float32)
  return embed


@dataclasses.dataclass(frozen=True)
class Tower:
  """One image set's encoder: `model`'s `method` (None: `__call__`) on the
  student's variables, or with `teacher` on the teacher's, at `image_size`."""
  model: object
  method: str | None
  image_size: int
  teacher: bool = False


class Towers:
  """A model's towers and the functions that embed with them."""

  def __init__(self, towers: dict, *, model_config=None):
    """`model_config` (the student's `config.model`) lets `fns(portable=True)`
    rebuild the student for each platform."""
    self.towers = dict(towers)
    self._model_config = model_config
    self._jitted = {}

  @classmethod
  def of(cls, task: str, model, image_size: int, *, model_config=None, teacher_model=None,
         teacher_image_size: int | None = None) -> "Towers":
    towers = {t: Tower(model, m, int(image_size)) for t, m in tasks.towers(task).items()}
    if teacher_model is not None:
      towers["teacher"] = Tower(teacher_model, None, int(teacher_image_size), teacher=True)
    return cls(towers, model_config=model_config)

  @property
  def image_sizes(self) -> dict:
    return {name: t.image_size for name, t in self.towers.items()}

  def fns(self, portable: bool = False) -> dict:
    """Tower -> unjitted `(variables, images) -> embeddings`.

    These run the model built for one platform. `portable=True` (what export
    lowers for cpu, cuda and tpu at once) resolves `dtype="auto"` per
    platform at lowering time instead: float32 in the CPU lowering, bfloat16
    in the GPU and TPU ones (the parameters are float32 either way).
    """
    fns = {name: embed_fn(t.model, t.method) for name, t in self.towers.items()}
    if portable and self._model_config is not None:
      on_cpu, on_accelerator = (build_model(self._model_config, p) for p in ("cpu", "tpu"))
      if models.dtype_of(on_cpu) != models.dtype_of(on_accelerator):
        for name, t in self.towers.items():
          if not t.teacher:
            fns[name] = functools.partial(models.layers.on_cpu_else, embed_fn(on_cpu, t.method),
                                          embed_fn(on_accelerator, t.method))
    return fns

  def jitted(self, mesh) -> dict:
    """`fns()` jitted for `mesh` (any axis types: run on its Auto twin,
    `sharding.auto_mesh`), once: every evaluation reuses them."""
    mesh = sharding.auto_mesh(mesh)
    if mesh not in self._jitted:
      self._jitted[mesh] = {
          name: sharding.InContextMesh(mesh, jax.jit(
              fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
              out_shardings=sharding.replicated(mesh)))
          for name, fn in self.fns().items()}
    return self._jitted[mesh]

  def bind(self, mesh, variables: dict, teacher_variables: dict | None = None) -> dict:
    """Tower -> jitted `images -> embeddings` on `variables` (the teacher
    tower on `teacher_variables`), batch sharded on the mesh's data axis:
    what evaluators take."""
    bound = {}
    for name, fn in self.jitted(mesh).items():
      if self.towers[name].teacher and teacher_variables is None:
        continue
      bound[name] = functools.partial(
          fn, teacher_variables if self.towers[name].teacher else variables)
    return bound


def embed_all(embed, images, batch_size: int, mesh, between=None) -> np.ndarray:
  """Embeds every image with `embed` (a bound tower function); the last
  batch is padded to keep one compiled shape. Each process feeds its share
  of every batch. `between()`, if given, runs before each batch (it may
  raise to abandon the work). `mesh`: as `Towers.jitted`'s."""
  mesh = sharding.auto_mesh(mesh)
  n_data = mesh.shape[sharding.DATA_AXIS]
  batch_size = max(n_data, batch_size // n_data * n_data)
  outputs = []
  for start in range(0, len(images), batch_size):
    if between is not None:
      between()
    chunk = np.asarray(images[start:start + batch_size])
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    per = len(chunk) // jax.process_count()
    share = chunk[jax.process_index() * per:(jax.process_index() + 1) * per]
    out = embed(sharding.global_batch({"x": share}, mesh)["x"])
    outputs.append(sharding.to_host(out)[:batch_size - pad])
  return np.concatenate(outputs).astype(np.float32)


def model_variables(state: dict) -> dict:
  """The Flax variables of a train state's model (no empty batch_stats)."""
  variables = {"params": state["params"]}
  if jax.tree.leaves(state.get("batch_stats", {})):
    variables["batch_stats"] = state["batch_stats"]
  return variables


@dataclasses.dataclass
class InferenceModel:
  """A run restored for inference: its resolved config, the checkpoint's
  step, the mesh, the towers and the variables they run on."""
  config: object
  workdir: str
  step: int
  mesh: object
  towers: Towers
  variables: dict
  teacher_variables: dict | None = None

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  def embed_fns(self) -> dict:
    """Tower -> jitted `uint8 images -> float32 embeddings`."""
    return self.towers.bind(self.mesh, self.variables, self.teacher_variables)


def restore(workdir: str, config=None, *, step: int | None = None, devices=None,
            teacher: bool = False) -> InferenceModel:
  """The model of `workdir`'s checkpoint (default its latest; an older one
  when a newer one does not restore), on a mesh of `devices` (default all).

  `config`: the run's config, default the `config.json` training wrote.
  `teacher=True` also restores the teacher tower (the asymmetric
  evaluation), from the student's own checkpoint. Reads only the model's
  entries of the checkpoint; builds no optimizer and no teacher object.
  """
  from jaxdml import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxdml import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.load_config(workdir) if config is None else config
  config = config_lib.resolve(config)
  directory = paths.as_path(workdir) / "checkpoints"
  # Checked before the Checkpointer, which would create the directory.
  if not directory.is_dir() or not any(directory.iterdir()):
    raise FileNotFoundError(f"No checkpoint in {directory}: train the run first "
                            "(python -m jaxdml.main --mode=train --config=... with the same "
                            "--workdir).")
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  model = build_model(config.model, mesh_platform(mesh))
  size = int(config.data.image_size)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               *tasks.dummy_inputs(config.task, size)))
  ckpt = checkpoint_lib.Checkpointer(workdir, model_config=config.model, async_save=False,
                                     read_only=True)
  try:
    steps = [step] if step is not None else sorted(ckpt.manager.all_steps(), reverse=True)
    for i, candidate in enumerate(steps):
      meta = ckpt.check_model(abstract, candidate)
      try:
        entries = ckpt.restore_as_saved(("params", "batch_stats") + (("teacher",) * teacher),
                                        sharding.replicated(mesh), candidate)
        break
      except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
        if i + 1 == len(steps):
          raise
        print(f"Checkpoint step {candidate} in {ckpt.directory} does not restore "
              f"({type(error).__name__}); using the one before.")
  finally:
    ckpt.close()
  teacher_model, teacher_size, teacher_variables = None, None, None
  if teacher:
    teacher_model, teacher_size = _teacher_tower(config, meta, model, mesh)
    teacher_variables = entries.get("teacher")
    if not teacher_variables or "params" not in teacher_variables:
      raise ValueError(f"{workdir}'s checkpoint holds no teacher variables to evaluate "
                       "with (the asymmetric evaluation needs a run with a teacher).")
  towers = Towers.of(config.task, model, size, model_config=config.model,
                     teacher_model=teacher_model, teacher_image_size=teacher_size)
  return InferenceModel(config=config, workdir=paths.join(workdir), step=int(candidate),
                        mesh=mesh, towers=towers, variables=model_variables(entries),
                        teacher_variables=teacher_variables)


def _teacher_tower(config, meta: dict, student_model, mesh) -> tuple:
  """The teacher's model and image size, from the student's checkpoint
  (runs before it recorded them: the config's `teacher.model`, or the
  frozen teacher's own workdir)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  settings = config.get("teacher")
  if settings is None or not settings.get("kind"):
    raise ValueError("The asymmetric evaluation needs a run with a config.teacher.")
  size = (int(config.data.views["hi"]) if settings.images == "image_hi"
          else int(config.data.image_size))
  description = meta.get("teacher_model")
  if description is None and settings.kind == "frozen":
    if settings.get("model"):
      description = config_lib.as_dict(settings.model)
    else:  # Checkpoints from before the teacher's architecture was recorded.
      from jaxdml.teacher import builtin  # pylint: disable=g-import-not-at-top
      description = dict(builtin.saved_model(settings.get("workdir"), settings.get("step"),
                                           settings.get("recipe") or ""))
  if description is None:
    return student_model, size
  description = models.with_dtype(pretrained.model_kwargs(description),
                                  models.dtype_of(student_model))
  return models.get(description.pop("name"), platform=mesh_platform(mesh), **description), size
