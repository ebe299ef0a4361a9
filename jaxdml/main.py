"""jaxdml command line: train, evaluate or export a recipe.

    python -m jaxdml.main --config=configs/sketchy_rtl.py:demo --workdir=workdirs/demo
    jaxdml-train --config=sketchy_rtl:demo --workdir=workdirs/demo --mode=eval
    python -m jaxdml.main --config=configs/sketchy_rtl.py --config.batch_size=64 ...
    python -m jaxdml.main --config=cub_obdsd:demo --mode=print_config

`--config=FILE.py:ARG` calls `get_config(ARG)`; a shipped recipe is also
found by its name (`--config=sketchy_rtl:demo`). `--config.FIELD=VALUE`
overrides one field of the (locked) config, so a typo is an error. This
module only parses flags and calls library functions.
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Recipe file or name and its argument, e.g. configs/sketchy_rtl.py:demo "
    "or sketchy_rtl:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "print_config"],
                  "What to do; print_config prints the resolved config (every default "
                  "filled in) and exits.")
flags.DEFINE_string("cpu_devices", "auto", "JAX devices to split a CPU into (data parallel "
                    "over cores): 'auto' or a count; 1 keeps one device. No effect on GPU/TPU.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "print_config":
    from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
    print(config_lib.resolve(FLAGS.config))
    return
  if not FLAGS.workdir:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --workdir.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  from jaxdml import paths  # pylint: disable=g-import-not-at-top
  paths.check_reachable(FLAGS.workdir, folder=True)  # a bad URL or bucket fails before any compile
  # Imported here so that `--help` answers without starting JAX.
  from jaxdml import sharding, train  # pylint: disable=g-import-not-at-top
  sharding.use_cpu_cores_as_devices(FLAGS.cpu_devices, int(FLAGS.config.batch_size))
  logging.info("Config:\n%s", FLAGS.config)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    results = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    print({k: v for k, v in results.items()})
  else:
    from jaxdml.apps import export  # pylint: disable=g-import-not-at-top
    path = export.export_saved_model(FLAGS.config, FLAGS.workdir)
    print(f"SavedModel written to {path}")


def run():
  """The `jaxdml-train` command (`jaxdml.commands.run`: recipes by name,
  user errors in one line)."""
  from jaxdml import commands  # pylint: disable=g-import-not-at-top
  commands.run(main)


if __name__ == "__main__":
  run()
