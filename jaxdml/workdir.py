"""What a run's workdir holds, besides its checkpoints and metrics.

`workdir/config.json` is the run's config as given, written when training
starts, so tools that read the run later (`--mode=eval`, export, the image
index) rebuild its model without `--config`.
"""

from __future__ import annotations

import json

import ml_collections

from jaxdml import paths

CONFIG_FILE = "config.json"


def save_config(config, workdir: str) -> None:
  """Writes `workdir/config.json` (atomically: a reader never sees half)."""
  paths.write_text_atomic(paths.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `save_config` wrote in `workdir`, its renamed fields moved
  where they went (`jaxdml.config.upgrade_saved`)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  path = paths.as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: runs trained before jaxdml wrote it have none. Pass the "
        "run's recipe with --config=configs/NAME.py:ARG (with any --config.FIELD "
        "overrides it was trained with).")
  return config_lib.upgrade_saved(ml_collections.ConfigDict(json.loads(path.read_text())))
