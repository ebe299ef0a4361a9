"""A saved index's folder: files checked against a manifest, written whole.

`write_folder` fills a temporary folder, lists each of its files with its
size and sha256 in `manifest.json` and puts the folder in place: a local
one is renamed over the old (which steps aside first and goes last, so a
process killed at any point leaves one of them whole); a URL's files are
uploaded through `jaxdml.paths` and the manifest last, so an interrupted
upload never leaves an index that loads. `opened` reads the manifest,
checks its format and every file it lists before anything is used, and
reports any mismatch as one `IndexFileError` line naming the file and the
fix. `jaxdml.retrieval.index` says what the files are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np

from jaxdml import paths

# The image index's format 1 was this layout without the files' checksums.
FORMAT = 2
MANIFEST = "manifest.json"


class IndexFileError(ValueError):
  """A saved index that is damaged, mixed with another's files, or of
  another format."""


def check_replaceable(path: str) -> None:
  """An existing `path` is replaced only when it is an index (or empty):
  never someone's folder of photos."""
  target = paths.as_path(path)
  if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
    raise FileExistsError(f"{path} exists and is not an index (no {MANIFEST}); pick a new "
                          "folder, or remove it first.")


def write_folder(path: str, fill: Callable[[str], None], manifest: dict) -> dict:
  """Writes an index to the folder or URL `path`, replacing one there.

  `fill(folder)` writes the files into a local temporary folder; the
  manifest gets `format` and `files` (each file's size and sha256) and is
  written last. Returns the manifest.
  """
  check_replaceable(path)
  remote = paths.is_url(path)
  local = os.fspath(paths.as_path(path))
  tmp = tempfile.mkdtemp(prefix="jaxdml-index-") if remote else f"{local}.tmp-{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  try:
    fill(tmp)
    manifest = {"format": FORMAT, **manifest,
                "files": {name: {"size": os.path.getsize(os.path.join(tmp, name)),
                                 "sha256": _sha256(os.path.join(tmp, name))}
                          for name in _files_under(tmp)}}
    text = json.dumps(manifest, indent=2)
    if remote:
      paths.upload_tree(tmp, path, replace=True)
      (paths.as_path(path) / MANIFEST).write_text(text)  # last: the index is complete
      return manifest
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      f.write(text)
    old = f"{local}.old-{os.getpid()}"
    if os.path.exists(local):
      os.rename(local, old)
    try:
      os.rename(tmp, local)
    except BaseException:
      if os.path.exists(old):
        os.rename(old, local)
      raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


class Folder:
  """A checked index folder, local (a URL's is a temporary copy)."""

  def __init__(self, where: str, local: str, manifest: dict, rebuild: str):
    self.where = where  # the path or URL, for messages
    self.local = local
    self.manifest = manifest
    self.rebuild = rebuild

  def error(self, problem: str) -> IndexFileError:
    """The one-line error of a damaged index: what, where, and the fix."""
    return IndexFileError(f"{self.where}: {problem}; the index is damaged or mixed with "
                          f"another index's files: {self.rebuild}.")

  def has(self, name: str) -> bool:
    """Whether the manifest lists the file `name`."""
    return name in self.manifest["files"]

  def file(self, name: str) -> str:
    """The local path of `name`, a listed (so checked) file or folder."""
    if not (self.has(name) or any(f.startswith(name + "/") for f in self.manifest["files"])):
      raise self.error(f"the manifest lists no {name}")
    return os.path.join(self.local, *name.split("/"))

  def array(self, name: str, dtype: np.dtype | type, shape: tuple) -> np.ndarray:
    """The .npy file `name`, which must hold `dtype` [shape]."""
    try:
      array = np.load(self.file(name), allow_pickle=False)
    except ValueError:
      raise self.error(f"{name} is not a numpy array file") from None
    if array.dtype != dtype or array.shape != tuple(shape):
      raise self.error(f"{name} holds {array.dtype} {array.shape}, the manifest says "
                       f"{np.dtype(dtype)} {tuple(shape)}")
    return array

  def read_bytes(self, name: str) -> bytes:
    """The contents of the listed file `name`."""
    with open(self.file(name), "rb") as f:
      return f.read()


@contextlib.contextmanager
def opened(path: str, *, rebuild: str, required: tuple = ()) -> Iterator[Folder]:
  """The index at `path`, its manifest and every file it lists checked.

  Args:
    rebuild: the fix the errors name (how to rebuild this kind of index).
    required: manifest keys that must be there besides `format`, `files`.

  Raises:
    FileNotFoundError: no manifest (not an index, or an interrupted build).
    IndexFileError: anything else that does not match.
  """
  where = paths.join(path)
  manifest_path = paths.as_path(path) / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(f"{manifest_path} not found: {where} is not an index, or its "
                            f"build was interrupted; {rebuild}.")
  folder = Folder(where, "", {"files": {}}, rebuild)
  try:
    manifest = json.loads(manifest_path.read_bytes())
  except ValueError:  # JSON's and UTF-8's errors both
    raise folder.error(f"{MANIFEST} is not valid JSON (cut short or overwritten)") from None
  if not isinstance(manifest, dict):
    raise folder.error(f"{MANIFEST} is not a JSON object")
  if manifest.get("format") != FORMAT:
    raise IndexFileError(f"{where} is an index of format {manifest.get('format')}; this "
                         f"jaxdml reads format {FORMAT}: {rebuild}.")
  missing = [key for key in ("files", *required) if key not in manifest]
  if missing or not isinstance(manifest["files"], dict):
    raise folder.error(f"{MANIFEST} lacks {missing or 'its files list'}")
  local = paths.LocalCopy(path, download=True)
  folder = Folder(where, local.local, manifest, rebuild)
  try:
    for name, entry in sorted(manifest["files"].items()):
      _check(folder, name, entry)
    yield folder
  finally:
    local.close()


def _check(folder: Folder, name: str, entry) -> None:
  file = os.path.join(folder.local, *name.split("/"))
  if not isinstance(entry, dict) or not {"size", "sha256"} <= set(entry):
    raise folder.error(f"{MANIFEST} gives no size and sha256 for {name}")
  if not os.path.isfile(file):
    raise folder.error(f"{name} is missing")
  size = os.path.getsize(file)
  if size != entry["size"]:
    raise folder.error(f"{name} has {size} bytes where the manifest says {entry['size']}")
  if _sha256(file) != entry["sha256"]:
    raise folder.error(f"{name} is not the file this index was saved with (its sha256 differs)")


def _files_under(folder: str) -> list:
  """Every file under `folder`, as sorted '/'-separated relative paths."""
  found = []
  for root, _, names in os.walk(folder):
    relative = os.path.relpath(root, folder)
    found += [name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}"
              for name in names]
  return sorted(found)


def _sha256(file: str) -> str:
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
