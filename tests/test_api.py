"""The library's core API is typed and documented, and `import jaxdml` stays cheap.

Every public function of the losses (miners included), the retrieval
package, the memory and the model registry has a type hint and a docstring
(which states the shapes and dtypes of its arrays). Read from the source
with `ast`: nothing here imports JAX.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxdml"
CORE = sorted([*PACKAGE.glob("losses/*.py"), *PACKAGE.glob("retrieval/*.py"),
               PACKAGE / "memory.py", PACKAGE / "models" / "__init__.py"])


def _public_functions(tree: ast.Module):
  """(name, node) of the public module-level functions and the public methods
  of public classes."""
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
      yield node.name, node
    elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      for member in node.body:
        if (isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not member.name.startswith("_")):
          yield f"{node.name}.{member.name}", member


def _annotated(fn: ast.FunctionDef) -> bool:
  args = fn.args
  params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
  return fn.returns is not None or any(p is not None and p.annotation is not None
                                       for p in params)


def problems(source: str) -> list[str]:
  """What a module's public functions lack: '<name>: no type hint' or
  '<name>: no docstring'."""
  found = []
  for name, fn in _public_functions(ast.parse(source)):
    if not _annotated(fn):
      found.append(f"{name}: no type hint")
    if not ast.get_docstring(fn):
      found.append(f"{name}: no docstring")
  return found


def test_the_core_modules_are_found():
  names = {p.relative_to(PACKAGE).as_posix() for p in CORE}
  assert {"losses/__init__.py", "losses/miners.py", "losses/triplet.py", "retrieval/__init__.py",
          "retrieval/index.py", "memory.py", "models/__init__.py"} <= names
  assert len(CORE) >= 30
  functions = sum(len(list(_public_functions(ast.parse(p.read_text())))) for p in CORE)
  assert functions >= 150


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_public_function_has_a_type_hint_and_a_docstring(path):
  assert problems(path.read_text()) == [], (
      f"{path.relative_to(PACKAGE.parent)}: give each public function its parameters' and "
      "return types and a docstring with the shapes and dtypes of its arrays.")


def test_the_check_sees_a_missing_hint_or_docstring():
  assert problems('def f(x: int):\n  """Doc."""\n') == []
  assert problems('def f(x) -> int:\n  """Doc."""\n') == []
  assert problems('def f(x):\n  """Doc."""\n') == ["f: no type hint"]
  assert problems("def f(x: int):\n  return x\n") == ["f: no docstring"]
  assert problems('class C:\n  def m(self, x):\n    """Doc."""\n') == ["C.m: no type hint"]
  # Private functions and methods, and methods of private classes, are not API.
  assert problems("def _f(x):\n  pass\nclass C:\n  def _m(self):\n    pass\n"
                  "class _D:\n  def m(self):\n    pass\n") == []


def test_every_name_in_all_is_a_module_of_the_package():
  source = (PACKAGE / "__init__.py").read_text()
  listed = next(node.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__all__" for t in node.targets))
  names = set(ast.literal_eval(listed)) - {"__version__"}
  missing = {n for n in names
             if not (PACKAGE / f"{n}.py").exists() and not (PACKAGE / n / "__init__.py").exists()}
  assert not missing
  assert {"config", "data", "evaluators", "inference", "losses", "memory", "models",
          "retrieval", "sharding"} <= names


def test_import_jaxdml_and_the_loss_registry_load_without_jax():
  # A config is checked with the registry alone; the subpackages load when used.
  code = ("import sys, jaxdml, jaxdml.losses; assert 'triplet' in jaxdml.losses.names(); "
          "assert 'sharding' in dir(jaxdml); "
          "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=PACKAGE.parent, timeout=120)
  assert proc.returncode == 0, proc.stderr
