"""The train state, the sharded train step, and the train/eval loop.

The state is one dict pytree: `params`, `batch_stats`, `opt`, `step`, `rng`,
`memory` (cross-batch memory, `{}` when unused) and `teacher` (`{}` when
unused). Its shapes come from `jax.eval_shape(init)`, its shardings from
`jaxdml.sharding`, and `jax.jit(init, out_shardings=...)` creates it already
laid out on the mesh. `make_train_step` returns the one jitted step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from jaxdml import checkpoint as checkpoint_lib
from jaxdml import config_lib, data as data_lib, models, optim, sharding, tasks
from jaxdml import pretrained, teacher as teacher_lib
from jaxdml.metrics_writer import MetricsWriter


def build_model(config):
  """The encoder of `config.model` (`name` plus constructor keywords)."""
  kwargs = pretrained.model_kwargs(config.model)
  return models.get(kwargs.pop("name"), **kwargs)


def build_teacher(config, model):
  """The teacher's module (`None` without a teacher); see jaxdml.teacher."""
  return teacher_lib.build_model(config, model) if teacher_lib.uses_teacher(config) else None


def _init_fn(config, model, tx):
  teacher_model = build_teacher(config, model)

  def init(rng):
    params_rng, run_rng = jax.random.split(rng)
    variables = model.init(params_rng, *tasks.dummy_inputs(config), train=False)
    params = variables["params"]
    dim = tasks.embedding_dim(model, config) if tasks.uses_memory(config) else 0
    teacher = {}
    if teacher_model is not None:
      teacher = teacher_lib.init_variables(
          config, teacher_model, tasks.model_variables(
              {"params": params, "batch_stats": variables.get("batch_stats", {})}),
          tasks.dummy_inputs(config, teacher_lib.image_size(config)))
    return {
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(run_rng),
        "memory": tasks.init_memory(config, dim),
        "teacher": teacher,
    }
  return init


def _abstract(config, model, tx, mesh):
  """`(init, abstract state, shardings)`: init traced once, shapes only."""
  init = _init_fn(config, model, tx)
  abstract = jax.eval_shape(init, jax.random.key(int(config.seed)))
  shardings = sharding.state_shardings(
      abstract, mesh, config.get("sharding", "replicated"))
  return init, abstract, shardings


def create_train_state(config, model, tx, mesh):
  """Returns `(state, shardings)`, the state created directly on the mesh.

  Pretrained weights (`model.init_file`) and a frozen teacher are read
  here, once: from then on they are part of this run's checkpoints.
  """
  init, _, shardings = _abstract(config, model, tx, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(int(config.seed)))
  uses_teacher = teacher_lib.uses_teacher(config)
  if pretrained.init_files(config.model):
    state = pretrained.load_into(config, state, shardings)
    if uses_teacher and config.teacher.kind != "frozen":  # init copied the random weights
      state["teacher"] = jax.tree.map(jnp.copy, tasks.model_variables(state))
  if uses_teacher and config.teacher.kind == "frozen":
    state["teacher"] = teacher_lib.load_frozen(config, shardings["teacher"])
  return state, shardings


def abstract_state(config, model, tx, mesh):
  """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
  _, abstract, shardings = _abstract(config, model, tx, mesh)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings), shardings


def make_train_step(config, model, tx, mesh, state_shardings, schedule=None):
  """The jitted `(state, batch) -> (state, metrics)`; the state is donated.

  The batch is sharded on the mesh's `data` axis and the state keeps the
  given shardings. A step whose loss or gradients are not finite leaves the
  state as it was (only `step` moves on) and reports `finite = False`; the
  loop stops the run on it, so the last checkpoint stays a good one.
  """
  task = config.task
  teacher_model = build_teacher(config, model)

  def teacher_outputs(state, batch):
    if teacher_model is None:
      return None
    out, _ = teacher_model.apply(
        state["teacher"], *tasks.model_inputs(task, batch, config.teacher.get("images", "same")),
        train=False)
    return jax.lax.stop_gradient(out)

  def step_fn(state, batch):
    rng = jax.random.fold_in(sharding.as_key(state["rng"]), state["step"])
    has_bn = bool(jax.tree.leaves(state["batch_stats"]))
    teacher_out = teacher_outputs(state, batch)

    def loss_fn(params):
      variables = tasks.model_variables(dict(state, params=params))
      (outputs, _), updates = model.apply(
          variables, *tasks.model_inputs(task, batch), train=True,
          mutable=["batch_stats"] if has_bn else [], rngs={"dropout": rng})
      loss, aux, memory = tasks.compute_loss(config, outputs, batch, state["memory"],
                                             state["step"], teacher_out)
      return loss, (aux, updates.get("batch_stats", {}), memory)

    (loss, (aux, batch_stats, memory)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = dict(state, params=optax.apply_updates(state["params"], updates),
                   opt=opt, batch_stats=batch_stats, memory=memory)
    if teacher_model is not None:
      updated["teacher"] = teacher_lib.update(
          config, state["teacher"], tasks.model_variables(updated), state["step"])
    new_state = jax.lax.cond(finite, lambda: updated, lambda: dict(state))
    new_state["step"] = state["step"] + 1
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new_state, metrics

  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


class NonFiniteLossError(FloatingPointError):
  pass


def _summarise(pending: list[tuple[int, dict]]) -> dict:
  """Means over the steps since the last log; raises on a non-finite step."""
  steps = [s for s, _ in pending]
  host = jax.device_get([m for _, m in pending])
  for step, m in zip(steps, host):
    if not bool(m["finite"]):
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {step} (loss={m['loss']}); the "
          "state was not updated and no checkpoint was written after it. Lower "
          "config.optimizer.lr, set config.optimizer.grad_clip_norm, or check "
          "the data; a rerun resumes from the last good checkpoint.")
  keys = [k for k in host[-1] if k != "finite"]
  return {k: float(np.mean([m[k] for m in host])) for k in keys}


def _make_evaluator(config, model, mesh, workdir):
  if config.get("eval") is None or not config.eval.get("enabled", True):
    return None
  from jaxdml.retrieval import evaluator  # pylint: disable=g-import-not-at-top
  return evaluator.Evaluator.from_config(config, model, mesh, workdir,
                                         teacher_model=build_teacher(config, model))


def setup(config, workdir: str):
  """Everything a run needs before its first step; shared by train and eval."""
  sharding.maybe_initialize_distributed()
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.get("mesh", None) and config.mesh.to_dict())
  sharding.check_batch_size(int(config.batch_size), mesh)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optimizer, int(config.total_steps))
  ckpt = checkpoint_lib.Checkpointer(
      workdir, keep=int(config.get("keep_checkpoints", 3)),
      every=int(config.get("checkpoint_every", 1000)), model_config=config.model)
  return mesh, model, tx, schedule, ckpt


def restore_or_create(config, model, tx, mesh, ckpt):
  if ckpt.latest_step() is not None:
    if jax.process_index() == 0:
      print(f"Resuming from {ckpt.directory}, step {ckpt.latest_step()}.")
    target, shardings = abstract_state(config, model, tx, mesh)
    return ckpt.restore(target), shardings
  return create_train_state(config, model, tx, mesh)


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  `stop_after` ends this run after that many steps, checkpointing first, as
  a preempted or time-limited job would; a rerun goes on from there.
  Returns the last evaluation's metrics (empty without evaluation).
  """
  mesh, model, tx, schedule, ckpt = setup(config, workdir)
  start = ckpt.latest_step() or 0
  # The data first: a missing data set should fail before minutes of compiling.
  batches = data_lib.train_batches(
      config.data, seed=int(config.seed), global_batch_size=int(config.batch_size),
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), task=config.task)
  state, shardings = restore_or_create(config, model, tx, mesh, ckpt)
  total = int(config.total_steps)
  end = total if stop_after is None else min(total, start + int(stop_after))
  step_fn = make_train_step(config, model, tx, mesh, shardings, schedule)
  writer = MetricsWriter(workdir, resume_step=start)
  evaluator = _make_evaluator(config, model, mesh, workdir)
  log_every = max(1, int(config.get("log_every", 50)))
  eval_every = int(config.get("eval_every", 0))
  results, pending = {}, []
  bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  t0 = time.perf_counter()
  try:
    for step in range(start + 1, end + 1):
      state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
      pending.append((step, metrics))
      bar.update(1)
      must_save = ckpt.should_save(step, total) or step == end
      if step % log_every == 0 or step == total or must_save:
        summary = _summarise(pending)
        pending = []
        summary["steps_per_sec"] = (step - start) / (time.perf_counter() - t0)
        writer.write(step, summary)
        bar.set_postfix(loss=f"{summary['loss']:.4f}")
      if evaluator and (step == total or (eval_every and step % eval_every == 0)):
        results = evaluator.run(state, step)
        writer.write(step, results)
        bar.write(f"step {step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
      if must_save:
        ckpt.save(step, state)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return results


def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=eval`: the evaluator on the workdir's latest checkpoint."""
  mesh, model, tx, _, ckpt = setup(config, workdir)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(
        f"--mode=eval: no checkpoint in {ckpt.directory}; train first with "
        "--mode=train and the same --workdir.")
  state, _ = restore_or_create(config, model, tx, mesh, ckpt)
  step = int(jax.device_get(state["step"]))
  evaluator = _make_evaluator(config, model, mesh, workdir)
  if evaluator is None:
    raise ValueError("--mode=eval needs config.eval; this config has none.")
  results = evaluator.run(state, step)
  MetricsWriter(workdir, resume_step=10**12).write(step, dict(results, mode="eval"))
  ckpt.close()
  return results
