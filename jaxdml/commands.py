"""How jaxdml's commands run: recipes by name, and errors a user can act on.

Every command (`jaxdml-train` / `python -m jaxdml.main`, `jaxdml-index`,
`jaxdml-search`, `jaxdml-bench`) runs its `main` through `run`:
- `--config=NAME[:ARG]` may name a shipped recipe (`jaxdml.config.recipe_path`);
- an error jaxdml raised about the user's input or environment (a bad
  config or path, missing data, a model that does not fit the checkpoint,
  a workdir in use, a full disk, a missing extra) prints one or two lines
  that name the thing and the fix, and exits 1, without a traceback;
  `JAXDML_TRACEBACK=1` shows it. Errors raised elsewhere (JAX, orbax,
  TensorFlow: internal ones) keep their traceback;
- a second Ctrl-C (the first asks a training run to checkpoint and stop)
  exits 130 with one line.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app

# Raised by jaxdml for what a user gave or has: the message says what to do.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError, ImportError, RuntimeError, KeyError,
                FloatingPointError)
_OURS = os.path.dirname(os.path.abspath(__file__))


def _raised_by_jaxdml(error: BaseException) -> bool:
  """Whether the innermost frame that raised `error` is jaxdml's own code."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return filename.startswith(_OURS) or os.sep + "data_prep" + os.sep in filename


def _from_a_config_flag(error: BaseException) -> bool:
  """ml_collections defers a bad `--config.FIELD=` override until the
  config is first read: its error then passes through its config flags."""
  tb = error.__traceback__
  while tb is not None:
    if "ml_collections" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


# The machine's, whoever's code met it: a full disk, a read-only or
# forbidden path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def user_message(error: BaseException) -> str | None:
  """The one-line report of a user error, or None for an internal one."""
  if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
    where = f": {error.filename}" if error.filename else ""
    return (f"jaxdml: {error.strerror or error}{where}. Free space or fix the permissions; "
            "a rerun resumes from the last checkpoint.")
  if isinstance(error, (AttributeError, KeyError, OSError, ValueError)) and _from_a_config_flag(
      error):
    text = " ".join(str(error).replace("\\n", "\n").replace("\\'", "'").split())
    field = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", text)
    if field:
      return (f"jaxdml: --config: the config has no field {field.group(1)!r} (did you mean "
              f"{field.group(2)!r}?); --mode=print_config lists them all.")
    return f"jaxdml: --config: {text}"
  if not isinstance(error, _USER_ERRORS) or not _raised_by_jaxdml(error):
    return None
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text[1:-1]
  return f"jaxdml: {text}"


def _main_reporting(main):
  def wrapped(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      print("\njaxdml: stopped by Ctrl-C; a rerun resumes from the last checkpoint.",
            file=sys.stderr)
      sys.exit(130)
    except Exception as error:  # pylint: disable=broad-except  (sorted out below)
      message = user_message(error)
      if message is None or os.environ.get("JAXDML_TRACEBACK"):
        raise
      print(message, file=sys.stderr)
      print("(JAXDML_TRACEBACK=1 shows where it was raised.)", file=sys.stderr)
      sys.exit(1)
  return wrapped


def _parser(flag: str):
  """absl's flag parser, with recipes by name and a bad config override
  (`--config.optimizer.lrr=`, deferred by ml_collections) in one line."""
  def parse(argv):
    from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
    try:
      return app.parse_flags_with_usage(config_lib.expand_recipe_flags(argv, flag))
    except Exception as error:  # pylint: disable=broad-except  (sorted out below)
      message = user_message(error)
      if message is None or os.environ.get("JAXDML_TRACEBACK"):
        raise
      print(f"FATAL Flags parsing error: {message.removeprefix('jaxdml: ')}", file=sys.stderr)
      sys.exit(1)
  return parse


def run(main, *, flag: str = "config") -> None:
  """`app.run(main)`, with recipes by name and user errors in one line."""
  app.run(_main_reporting(main), flags_parser=_parser(flag))

