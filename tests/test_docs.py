"""Every code block of README.md and docs/*.md runs, or its commands resolve.

The rules, which the documentation's blocks follow:

- A ```python block is executed on its own: a fresh namespace, the current
  directory a new temporary one. Blocks never build on each other, so each
  can be copied into a file as it is. A ```python pml block is the same,
  run only where torch and pytorch-metric-learning are installed (the test
  extra): it compares with PML.
- A ```sh or ```bash block is checked, not run: `python -m MODULE` imports
  resolve, `python FILE.py` files exist, console scripts (`jaxdml-train`,
  ...) are those of pyproject.toml, `make TARGET` targets are the
  Makefile's, each `--flag` (or `-f`) is one the command defines (absl's or
  argparse's, read from its source and the modules it imports directly),
  `--config.FIELD=...` goes to a command with a config flag, and
  `--config=RECIPE[:ARG]` names a recipe whose `get_config(ARG)` accepts
  ARG. A command this test does not know fails: check it here or mark it.
- A block that cannot run or be checked here (a GPU, a TPU pod, gs://
  credentials, a real data set, placeholders) has `<!-- not run: REASON -->`
  on the line before its fence; the reason must say why.
- Other fences (no language, ```text, ```json) are output or synopses and
  are not read.
"""
import ast
import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
FENCE = re.compile(r"^```(.*)$")
# absl's own flags, which every absl program accepts.
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok", "verbosity",
              "v", "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold",
              "showprefixforinfo", "only_check_args", "pdb", "pdb_post_mortem",
              "run_with_pdb", "run_with_profiling", "profile_file",
              "use_cprofile_for_profiling", "logger_levels"}


@dataclasses.dataclass
class Block:
  path: str  # relative to ROOT
  line: int  # of the opening fence, 1-based
  lang: str  # "python", "python pml", "sh", ...
  code: str
  not_run: str | None  # the reason, "" when the comment gives none

  @property
  def id(self):
    return f"{self.path}:{self.line}"


def read_blocks(path):
  lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    opening = FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
    marker = NOT_RUN.match(before.strip())
    end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
    if end is None:
      raise ValueError(f"{path}:{i + 1}: a fence that is never closed.")
    blocks.append(Block(path, i + 1, opening.group(1).strip(), "\n".join(lines[i + 1:end]),
                        marker.group(1).strip() if marker else None))
    i = end + 1
  return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.lang.split()[:1] == ["python"]]
SHELL = [b for b in ALL_BLOCKS if b.lang in ("sh", "bash", "shell", "console")]


def test_every_doc_file_has_blocks_and_marked_blocks_say_why():
  assert PYTHON and SHELL, "no python or shell blocks found: the fence parser broke"
  unexplained = [b.id for b in ALL_BLOCKS if b.not_run is not None and not b.not_run]
  assert not unexplained, f"<!-- not run: --> without a reason at {unexplained}"


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None],
                         ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, monkeypatch):
  if block.lang == "python pml":
    pytest.importorskip("torch")
    pytest.importorskip("pytorch_metric_learning")
  elif block.lang != "python":
    pytest.fail(f"{block.id}: fence 'python {block.lang[6:]}' is not one this test knows "
                "(python, python pml)")
  monkeypatch.chdir(tmp_path)
  code = compile(block.code, f"{block.path}, block at line {block.line}", "exec")
  exec(code, {"__name__": "__docs__"})  # pylint: disable=exec-used


# ------------------------------------------------------------ shell blocks
def _pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _source_of(module):
  """The repository file of `module` (pyproject's package-dir mapping
  followed, so jaxdml.data_prep is this checkout's data_prep/), or None."""
  mapping = _pyproject()["tool"]["setuptools"].get("package-dir", {})
  parts = module.split(".")
  for cut in range(len(parts), 0, -1):
    package = ".".join(parts[:cut])
    if package in mapping:
      base = os.path.join(ROOT, mapping[package], *parts[cut:])
      break
  else:
    base = os.path.join(ROOT, *parts)
  for candidate in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.exists(candidate):
      return candidate
  return None


def _defined_flags(source_file):
  """(flag names, whether one is a config flag) defined in `source_file` and
  in the repository modules it imports directly."""
  files = [source_file]
  tree = ast.parse(open(source_file, encoding="utf-8").read())
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      found = _source_of(name)  # None outside this checkout
      if found and found not in files:
        files.append(found)
  flags, config = set(), False
  for path in files:
    text = open(path, encoding="utf-8").read()
    flags |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", text))
    flags |= {f.replace("-", "_") for f in
              re.findall(r"add_argument\(\s*[\"']--?([\w-]+)[\"']", text)}
    config |= bool(re.search(r"DEFINE_config_(file|dict)\(\s*[\"']config[\"']", text))
  return flags, config


def _check_recipe(value):
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  spec, _, arg = value.partition(":")
  path = config_lib.recipe_path(spec)  # FileNotFoundError naming the recipes
  old = os.getcwd()
  try:
    os.chdir(ROOT)  # recipe paths in the docs are relative to the checkout
    assert os.path.exists(path), f"no recipe file {path}"
    config_lib.load_config(path, arg or None)
  finally:
    os.chdir(old)


def _check_args(command, source_file, args):
  flags, has_config = _defined_flags(source_file)
  for arg in args:
    if not arg.startswith("-") or arg == "-":
      continue
    name, _, value = arg.lstrip("-").partition("=")
    if "." in name:
      assert has_config and name.split(".")[0] == "config", (
          f"{command}: {arg} overrides a config field but the command has no --config")
      continue
    known = flags | ABSL_FLAGS
    assert name in known or (name.startswith("no") and name[2:] in known), (
        f"{command}: flag --{name} is not defined (defined: {sorted(flags)})")
    if name == "config" and has_config and value:
      _check_recipe(value)


def _commands(code):
  """Each command of a shell block as its argument list (continuations
  joined, comments dropped, `&&` and `;` split)."""
  text = code.replace("\\\n", " ")
  for line in text.splitlines():
    words = shlex.split(line, comments=True)
    command = []
    for word in words + [";"]:
      if word in ("&&", ";", "||"):
        if command:
          yield command
        command = []
      else:
        command.append(word)


def _check_command(words, makefile_targets, scripts):
  while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
    words = words[1:]  # environment assignments
  program, args = words[0], words[1:]
  if program == "make":
    for target in (a for a in args if not a.startswith("-") and "=" not in a):
      assert target in makefile_targets, f"make {target}: no such Makefile target"
  elif program in ("python", "python3"):
    if args[:1] == ["-m"]:
      module = args[1]
      assert importlib.util.find_spec(module) is not None, f"python -m {module}: no module"
      source = _source_of(module)
      assert source, f"python -m {module}: not a module of this checkout"
      _check_args(f"python -m {module}", source, args[2:])
    else:
      script = os.path.join(ROOT, args[0])
      assert os.path.isfile(script), f"python {args[0]}: no such file"
      _check_args(f"python {args[0]}", script, args[1:])
  elif program in scripts:
    module = scripts[program].split(":")[0]
    assert importlib.util.find_spec(module) is not None, f"{program} -> {module}: no module"
    _check_args(program, _source_of(module), args)
  else:
    pytest.fail(f"command {program!r}: not one this test checks (make, python, the "
                "console scripts); check it here or mark the block <!-- not run: why -->")


@pytest.mark.parametrize("block", [b for b in SHELL if b.not_run is None], ids=lambda b: b.id)
def test_shell_block_resolves(block):
  makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
  targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
  scripts = _pyproject()["project"]["scripts"]
  commands = list(_commands(block.code))
  assert commands, f"{block.id}: a shell block without a command"
  for words in commands:
    try:
      _check_command(words, targets, scripts)
    except (AssertionError, FileNotFoundError, ValueError) as error:
      raise AssertionError(f"{block.id}: {' '.join(words)}\n{error}") from error


def test_the_shell_check_catches_what_it_should():
  """The checks above fail on a wrong flag, module, target or recipe
  argument (a check that cannot fail proves nothing)."""
  makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
  targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
  scripts = _pyproject()["project"]["scripts"]
  good = "python -m jaxdml.main --config=configs/sketchy_rtl.py:smoke --workdir=w --config.seed=1"
  _check_command(shlex.split(good), targets, scripts)
  for bad in ("python -m jaxdml.main --workdri=w", "python -m jaxdml.nosuch", "make nosuch",
              "python -m jaxdml.main --config=configs/sketchy_rtl.py:nosuch_arg",
              "python -m jaxdml.main --config=nosuch_recipe", "jaxdml-search --nosuch=1",
              "python benchmarks/nosuch.py", "python -m jaxdml.bench --workdir=w",
              "python benchmarks/search.py --config.seed=1"):
    with pytest.raises((AssertionError, FileNotFoundError, ValueError)):
      _check_command(shlex.split(bad), targets, scripts)


def test_blocks_and_their_markers_are_read_as_written(tmp_path, monkeypatch):
  """The fence reader finds each block's language, line and marker (an
  empty reason is kept as "", which the marker test refuses)."""
  page = tmp_path / "page.md"
  page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- not run: needs a TPU pod -->\n"
                  "```sh\nmake demo\n```\n<!-- not run: -->\n\n```python pml\ny = 2\n```\n"
                  "```\noutput\n```\n")
  monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
  blocks = read_blocks("page.md")
  assert [(b.lang, b.line, b.code, b.not_run) for b in blocks] == [
      ("python", 3, "x = 1", None), ("sh", 8, "make demo", "needs a TPU pod"),
      ("python pml", 13, "y = 2", ""), ("", 16, "output", None)]
