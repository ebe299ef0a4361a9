"""Config parsing, validation, renamed fields, defaults and --mode=print_config."""

import subprocess
import sys

import ml_collections
import pytest

from jaxdml import teacher, train
from jaxdml import config as config_lib
from test_train import ROOT, load_config


def test_unknown_config_field_is_named(tmp_path):
  config = load_config("sketchy_rtl.py")
  config.unlock()
  config.optimzer = config.optimizer
  with pytest.raises(ValueError, match="'optimzer'.*did you mean 'optimizer'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_cli_override_of_unknown_field_fails_naming_it(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxdml.main", "--config=configs/sketchy_rtl.py:smoke",
       f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "lrr" in result.stderr


def test_unknown_config_argument_is_named():
  with pytest.raises(ValueError, match="'smok'.*did you mean 'smoke'"):
    load_config("sketchy_rtl.py", "smok")



@pytest.mark.parametrize("old,new", [
    ("regularizers", "config.terms"), ("teacher.loss", "config.terms.NAME"),
    ("teacher.epoch_steps", "config.epoch_steps"),
    ("memory.terms", "config.memory.loss_form"), ("eval", "config.evals")])
def test_renamed_fields_say_where_they_went(old, new):
  config = load_config("cub_obdsd.py")
  config.unlock()
  parent, _, leaf = old.rpartition(".")
  (config[parent] if parent else config)[leaf] = [] if leaf == "regularizers" else 3
  with pytest.raises(ValueError, match=f"config.{old} was renamed: use {new}"):
    config_lib.validate(config)


def test_unknown_loss_in_a_term_names_the_term_and_the_registered_losses():
  config = load_config("sop_irt.py")
  config.terms.kolep = dict(weight=1.0)
  with pytest.raises(ValueError, match=r"config.terms.kolep: Unknown loss 'kolep'.*koleo"):
    config_lib.validate(config)
  config = load_config("cub_raml.py")
  config.terms = ml_collections.ConfigDict()
  with pytest.raises(ValueError, match="nothing to train"):
    config_lib.validate(config)


def test_a_bad_reduction_is_refused_at_validation_naming_the_reducers():
  def with_reduction(reduction):
    config = load_config("sop_xbn.py")
    config.loss = ml_collections.ConfigDict(dict(config.loss.to_dict(), reduction=reduction))
    return config
  with pytest.raises(ValueError, match=r"config.loss: reduction='avg_nonzeroo'.*avg_nonzero"):
    config_lib.validate(with_reduction("avg_nonzeroo"))
  with pytest.raises(ValueError, match="needs 'low' or 'high'"):
    config_lib.validate(with_reduction(dict(name="threshold")))
  config_lib.validate(with_reduction(dict(name="threshold", low=0.1)))
  code = ("import sys, ml_collections; from jaxdml import config;"
          "c = config.load_config('sop_xbn', 'smoke');"
          "c.loss = ml_collections.ConfigDict(dict(c.loss.to_dict(), reduction=dict(name='threshold', low=0.1)));"
          "config.validate(c); assert 'jax' not in sys.modules, 'validation imported jax'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_teacher_kind_and_fields_are_checked_at_validation():
  config = load_config("cub_obdsd.py")
  config.teacher.kind = "ema"
  with pytest.raises(ValueError, match=r"kind='ema': expected one of \('frozen', 'momentum', 'previous_epoch'"):
    config_lib.validate(config)
  config = load_config("cub_obdsd.py")
  config.teacher.momentum = 0.9  # a momentum teacher's field on a previous_epoch teacher
  with pytest.raises(ValueError, match=r"'previous_epoch' teacher takes no field.*\['momentum'\]"
                                       r".*its fields: \['feeds_memory', 'images', 'kind'\]"):
    config_lib.validate(config)
  config = load_config("cub_obdsd.py")
  config.epoch_steps = 0
  with pytest.raises(ValueError, match="previous_epoch teacher needs config.epoch_steps > 0"):
    config_lib.validate(config)


def test_resolve_fills_defaults_and_keeps_what_the_recipe_set():
  config = ml_collections.ConfigDict(dict(
      seed=1, task="single", batch_size=8, total_steps=4, model=dict(name="resnet_tiny"),
      loss=dict(name="triplet"), optimizer=dict(name="adam"), data=dict(name="x"),
      memory=dict(size=16)))
  resolved = config_lib.resolve(config)
  assert resolved.log_every == 50 and resolved.checkpoint_every == 1000
  assert resolved.mesh.to_dict() == {"data": -1} and resolved.epoch_steps == 0
  assert resolved.memory.size == 16 and resolved.memory.loss_form == "joint"
  assert resolved.teacher is None and resolved.terms.to_dict() == {}
  assert "log_every" not in config  # the caller's config is left as it was
  recipe = load_config("sop_xbn.py", "demo,adapt=kalman")
  resolved = config_lib.resolve(recipe)
  given, got = _leaves(recipe.to_dict()), _leaves(resolved.to_dict())
  assert given and all(got[k] == v for k, v in given.items())
  assert got["optimizer/b1"] == 0.9 and got["evals/retrieval/protocol"] == "auto"


def _leaves(tree, prefix=""):
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_leaves(v, f"{prefix}/{k}" if prefix else k))
  return out


def test_print_config_prints_the_resolved_config_without_a_workdir():
  result = subprocess.run(
      [sys.executable, "-m", "jaxdml.main", "--config=configs/cub_obdsd.py:demo",
       "--mode=print_config", "--config.terms.obd_sd.lambda_=10"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  printed = result.stdout
  assert "epoch_steps: 50" in printed and "lambda_: 10.0" in printed
  assert "kind: previous_epoch" in printed and "keep_checkpoints: 3" in printed
  missing = subprocess.run([sys.executable, "-m", "jaxdml.main",
                            "--config=configs/cub_obdsd.py:smoke"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and "--mode=train needs --workdir" in missing.stderr
