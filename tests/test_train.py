"""The spine: end-to-end runs, sharding equality, exact resume, clear errors."""

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import checkpoint, metrics_writer, objective, train
from jaxdml import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sketchy_rtl's smoke run is covered, with evaluation, by its own test below.
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "[a-z]*.py"))
                 if not p.endswith("sketchy_rtl.py"))
# A recipe's configs for other data sets differ from its CUB one only in
# constants (their :smoke runs on the same embedded data): they train in the
# slow suite, and every config is still resolved and built below.
SAME_RECIPE_OTHER_DATA = ("cars_", "sop_irt", "sop_obdsd", "sop_proxy_anchor", "sop_raml",
                          "inshop_", "deepfashion2_")


def load_config(name, arg="smoke"):
  return config_lib.load_config(os.path.join(ROOT, "configs", name), arg)


def evaluation(config, enabled: bool) -> None:
  """Every evaluator of the recipe switched on or off (off: training only)."""
  for name in config.evals:
    config.evals[name].enabled = enabled


def has_frozen_teacher(config) -> bool:
  """The recipe distils a trained teacher (RAML, SBIR KD): train it first."""
  return bool(config.get("teacher")) and config.teacher.kind == "frozen"


def train_teacher_of(config, workdir):
  """Trains the smoke teacher a frozen-teacher recipe names; sets its workdir."""
  name, _, arg = config.teacher.recipe.partition(":")
  teacher_config = config_lib.load_config(name, arg)
  teacher_config.total_steps = 1
  evaluation(teacher_config, False)
  train.train_and_evaluate(teacher_config, workdir)
  config.teacher.workdir = workdir


def short_run(total, checkpoint_every):
  """The cheapest recipe run (OBD-SD's smoke without its teacher, eval off,
  every step logged): `(config, the same as python -m jaxdml.main flags)`."""
  arg = "smoke"  # with its previous-epoch teacher: the state holds the teacher too
  config = load_config("cub_obdsd.py", arg)
  config.total_steps = total
  config.checkpoint_every = checkpoint_every
  config.log_every = 1
  evaluation(config, False)
  flags = [f"--config=configs/cub_obdsd.py:{arg}", f"--config.total_steps={total}",
           f"--config.checkpoint_every={checkpoint_every}", "--config.log_every=1",
           "--config.evals.retrieval.enabled=False"]
  return config, flags


def losses_of(workdir):
  return [row["loss"] for row in metrics_writer.read_metrics(workdir) if "loss" in row]


def final_state(workdir, config):
  parts, ckpt = train.setup(config, workdir)
  state = train.restore_or_create(parts, ckpt)
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state))


def final_params(workdir, config):
  return final_state(workdir, config)["params"]


# The SBIR recipe, a memory recipe whose Kalman-adapted memory is in use from
# the second step, and OBD-SD, whose previous-epoch teacher lives in the
# state: all must shard and resume exactly.
EQUALITY_CASES = [("sketchy_rtl.py", "smoke"), ("sop_xbn.py", "smoke,adapt=kalman"),
                  ("cub_obdsd.py", "smoke"), ("cub_raml.py", "smoke")]
# OBD-SD's resume is also what the damaged-checkpoint, SIGTERM and gs://
# tests check (short_run): it runs in the slow suite.
RESUME_CASES = EQUALITY_CASES[:2] + [pytest.param(*c, marks=pytest.mark.slow)
                                     for c in EQUALITY_CASES[2:]]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_resolves_and_builds(path):
  """Each config file, :smoke and full: resolved, and its :smoke parts built
  (the state's shapes traced, nothing compiled) unless a frozen teacher
  must be trained first."""
  from jaxdml import build  # pylint: disable=g-import-not-at-top
  for arg in ("smoke", ""):
    config = config_lib.resolve(load_config(os.path.basename(path), arg))
    frozen_teacher = has_frozen_teacher(config)
    if arg and not frozen_teacher:
      assert jax.tree.leaves(build.build(config).abstract["params"])


# sketchy_rtl_kd trains end to end (teacher, then 3 student steps) in
# test_teacher.py's frozen-teacher test; its smoke run here adds only an
# evaluation, already covered by every other config: slow, for CI time.
SLOW_SMOKE = SAME_RECIPE_OTHER_DATA + ("sketchy_rtl_kd",)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow)
    if os.path.basename(p).startswith(SLOW_SMOKE) else p for p in CONFIGS],
    ids=os.path.basename)
def test_every_config_smoke_runs_end_to_end(path, tmp_path):
  config = load_config(os.path.basename(path))
  config.total_steps = 1
  if has_frozen_teacher(config):
    train_teacher_of(config, str(tmp_path / "teacher"))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  rows = metrics_writer.read_metrics(workdir)
  assert rows[0]["step"] == 1 and np.isfinite(rows[0]["loss"])
  assert checkpoint.Checkpointer(workdir).latest_step() == 1


def test_smoke_evaluates_and_draws_the_picture(tmp_path):
  config = load_config("sketchy_rtl.py")
  results = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results["recall@1"] <= 1.0
  assert "category/recall@1" in results
  assert os.path.exists(tmp_path / f"retrieval_{config.total_steps}.png")
  evaluated = train.evaluate_checkpoint(config, str(tmp_path))
  assert evaluated == pytest.approx(results)


# RAML's (views, jitter and mixup made in the sharded step) costs ~50 s and
# OBD-SD's ~35 s (its 8-device step still runs in the every-config smoke
# test, only the 1-device comparison moves): slow, to keep CI near 15
# minutes on 2 cores.
@pytest.mark.parametrize("name,arg", EQUALITY_CASES[:2] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in EQUALITY_CASES[2:]])
def test_one_device_and_eight_devices_take_the_same_steps(tmp_path, name, arg):
  runs = {}
  for n in (1, 8):
    config = load_config(name, arg)
    config.total_steps = 3
    evaluation(config, False)
    config.mesh.data = n
    if has_frozen_teacher(config):
      # RAML: its views, jitter and mixup are made inside the sharded step.
      if n == 1:
        train_teacher_of(config, str(tmp_path / "teacher"))
      config.teacher.workdir = str(tmp_path / "teacher")
    workdir = str(tmp_path / f"dev{n}")
    train.train_and_evaluate(config, workdir)
    runs[n] = (losses_of(workdir), final_state(workdir, config))
  np.testing.assert_allclose(runs[1][0], runs[8][0], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               runs[1][1], runs[8][1])


@pytest.mark.parametrize("name,arg", RESUME_CASES)
def test_resume_equals_uninterrupted_run(tmp_path, name, arg):
  config = load_config(name, arg)
  config.total_steps = 4
  config.checkpoint_every = 100
  evaluation(config, False)
  if has_frozen_teacher(config):
    train_teacher_of(config, str(tmp_path / "teacher"))
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed, stop_after=2)
  assert checkpoint.Checkpointer(resumed).latest_step() == 2
  train.train_and_evaluate(config, resumed)
  assert losses_of(straight) == pytest.approx(losses_of(resumed), abs=1e-6)
  # Everything: parameters, optimizer, BatchNorm statistics, memory, teacher, RNG.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               final_state(straight, config), final_state(resumed, config))


def test_memory_is_filled_and_used_in_the_step(tmp_path):
  config = load_config("sop_xbn.py", "smoke")
  config.total_steps = 4
  evaluation(config, False)
  train.train_and_evaluate(config, str(tmp_path))
  memory = final_state(str(tmp_path), config)["memory"]
  assert memory["valid"].sum() == min(4 * config.batch_size, config.memory.size)
  rows = [r for r in metrics_writer.read_metrics(str(tmp_path)) if "loss" in r]
  assert rows[-1]["memory_fill"] == pytest.approx(1.0)


def test_missing_data_set_names_the_data_prep_command(tmp_path):
  config = load_config("sketchy_rtl.py", "smoke")
  config.data.name = "sketchy"
  config.data.data_dir = str(tmp_path / "no_data_here")
  with pytest.raises(FileNotFoundError, match="python -m jaxdml.data_prep.build sketchy"):
    train.train_and_evaluate(config, str(tmp_path / "work"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = objective.Objective.__call__

  def nan_from_step_two(self, outputs, labels, memory, step, *args, **kwargs):
    loss, *rest = real(self, outputs, labels, memory, step, *args, **kwargs)
    return jnp.where(step >= 2, jnp.nan, loss), *rest

  monkeypatch.setattr(objective.Objective, "__call__", nan_from_step_two)
  config = load_config("sketchy_rtl.py")
  config.total_steps = 5
  config.checkpoint_every = 1
  evaluation(config, False)
  with pytest.raises(train.NonFiniteLossError, match="Non-finite loss or gradient at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  ckpt.close()
  monkeypatch.setattr(objective.Objective, "__call__", real)
  params = final_params(str(tmp_path), config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow  # ~55 s; CI keeps the recipe's every-config smoke run.
def test_proxy_anchor_recipe_trains_sharded_proxies_and_resumes(tmp_path):
  """The Proxy-Anchor recipe itself: its proxy table trains with the encoder
  (100x the learning rate, after a head-only warm-up step), and one device
  equals eight devices with the table split over them (a config sharding
  rule), interrupted and resumed."""
  from jaxdml import build  # pylint: disable=g-import-not-at-top
  config = load_config("cub_proxy_anchor.py", "smoke")
  config.total_steps = 3
  config.checkpoint_every = 100
  evaluation(config, False)
  assert config.optimizer.warm_steps == 1
  parts = build.build(config)
  initial = jax.device_get(parts.create_state())
  # The embedded smoke set has 4 categories; the table is [classes, dim].
  assert initial["loss_params"]["loss"]["proxies"].shape == (4, 16)
  config.mesh.data = 1
  train.train_and_evaluate(config, str(tmp_path / "one"))
  config.mesh.data = 8
  config.sharding_rules = {"proxies$": (None, "data")}
  spec = build.build(config).shardings["loss_params"]["loss"]["proxies"].spec
  assert tuple(spec) == (None, "data")
  train.train_and_evaluate(config, str(tmp_path / "eight"), stop_after=1)
  train.train_and_evaluate(config, str(tmp_path / "eight"))
  one, eight = (final_state(str(tmp_path / w), config) for w in ("one", "eight"))
  multiplier = config.optimizer.lr_multipliers["loss_params"]
  reach = multiplier * sum(float(parts.schedule(i)) for i in range(3))
  moved = np.abs(one["loss_params"]["loss"]["proxies"] - initial["loss_params"]["loss"]["proxies"])
  # Trained at 100x: AdamW moves an entry by up to the step's lr, every step
  # (the smoke schedule halves it each step).
  assert 0.8 * reach < moved.max() < 1.01 * reach
  np.testing.assert_allclose(losses_of(str(tmp_path / "one")), losses_of(str(tmp_path / "eight")),
                             rtol=1e-5)
  # Adam turns a gradient that is float-summation noise (near zero) into up
  # to a whole step, so one element in a thousand may differ by a fraction of
  # the learning rate; everything else agrees to float precision.
  encoder_reach = sum(float(parts.schedule(i)) for i in range(3))

  def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    off = np.abs(a - b) > 1e-5 + 1e-4 * np.abs(b)
    assert off.mean() <= 1e-3 and np.abs(a - b).max() <= encoder_reach, (off.sum(), off.size)

  rest = [{k: v for k, v in state.items() if k != "loss_params"} for state in (one, eight)]
  jax.tree.map(close, *rest)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               one["loss_params"], eight["loss_params"])


def test_a_run_stops_its_worker_processes_however_it_ends(tmp_path, monkeypatch):
  """Each worker process holds ~0.1 GB: a run closes its pipeline when it
  ends, and when its step fails. A failed run's traceback, which a notebook
  keeps (`sys.last_traceback`), holds the run's frames: before, it kept the
  workers running too."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  config, _ = short_run(2, checkpoint_every=1)
  config.data.num_workers = 2  # worker processes even on the embedded set
  earlier = {p.pid for p in multiprocessing.active_children()}

  def new_children():
    return [p.pid for p in multiprocessing.active_children() if p.pid not in earlier]

  train.train_and_evaluate(config, str(tmp_path / "ended"))
  assert len(losses_of(str(tmp_path / "ended"))) == 2
  assert not new_children()

  running = []

  def failing_step(parts):
    def step(state, batch):
      running.extend(new_children())
      raise RuntimeError("a step that fails")
    return step

  monkeypatch.setattr(train, "make_train_step", failing_step)
  with pytest.raises(RuntimeError, match="a step that fails") as failure:
    train.train_and_evaluate(config, str(tmp_path / "failed"))
  assert len(running) == 2, running  # the step saw both workers at work
  assert failure.tb is not None  # the traceback, and the run's frames, still held
  assert not new_children()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  """Array files of the newest checkpoint truncated after its commit (a disk
  error): the rerun reports it, sets it aside, resumes from the step before
  and ends where an undisturbed run ends."""
  config, _ = short_run(4, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path / "plain"))
  damaged = tmp_path / "damaged"
  train.train_and_evaluate(config, str(damaged))
  arrays = [p for p in (damaged / "checkpoints" / "4" / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]
  assert arrays, "orbax's OCDBT data files"
  for path in arrays:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  train.train_and_evaluate(config, str(damaged))
  out = capsys.readouterr().out
  assert "Checkpoint step 4" in out and "does not restore" in out
  assert "Resuming from" in out and "step 2." in out
  assert (damaged / "damaged_checkpoints" / "4").is_dir()
  np.testing.assert_allclose(losses_of(str(damaged)), losses_of(str(tmp_path / "plain")),
                             rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, final_state(str(damaged), config),
               final_state(str(tmp_path / "plain"), config))
  # Every checkpoint damaged: an error that names the directory, no silent restart.
  for step_dir in (damaged / "checkpoints").iterdir():
    for path in step_dir.rglob("*"):
      if path.is_file() and path.parent.name == "d":
        path.write_bytes(b"")
  with pytest.raises(RuntimeError, match="No checkpoint in .*restores"):
    train.train_and_evaluate(config, str(damaged))


def test_bfloat16_run_trains_like_float32(tmp_path):
  """bf16 compute (what "auto" picks on GPU/TPU) on the smoke recipe with its
  teacher: every loss finite and within 5 % of the float32 run's at the same
  step, parameters, optimizer state and BN statistics still float32."""
  config, _ = short_run(4, checkpoint_every=4)
  train.train_and_evaluate(config, str(tmp_path / "f32"))
  config.model.dtype = "bfloat16"
  train.train_and_evaluate(config, str(tmp_path / "bf16"))
  f32, bf16 = losses_of(str(tmp_path / "f32")), losses_of(str(tmp_path / "bf16"))
  assert len(bf16) == 4 and np.all(np.isfinite(bf16))
  np.testing.assert_allclose(bf16, f32, rtol=0.05)
  state = final_state(str(tmp_path / "bf16"), config)
  floats = [a.dtype for a in jax.tree.leaves(
      {k: state[k] for k in ("params", "opt", "batch_stats", "teacher")})
            if np.issubdtype(a.dtype, np.floating)]
  assert floats and set(floats) == {np.dtype(np.float32)}
