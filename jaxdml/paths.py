"""Paths that may be cloud URLs: one abstraction (etils.epath) for every file
jaxdml reads or writes, so a workdir, an export, an init file or a teacher
may live on `gs://` (or any scheme epath knows) as well as on a local disk.

A local storage emulator: with `STORAGE_EMULATOR_HOST=http://HOST:PORT` set,
every `gs://` access of jaxdml goes to that server. `configure_emulator`
(run when jaxdml is imported) derives what each client needs from that one
variable: tensorstore (orbax's checkpoints) `TENSORSTORE_GCS_HTTP_URL` and a
test token, array_record (TFDS data on a bucket; google-cloud-cpp's client)
`CLOUD_STORAGE_EMULATOR_ENDPOINT`, epath the fsspec/gcsfs backend (which reads
the variable itself) instead of TensorFlow's GCS client, which only talks to
Google's servers.
TensorFlow therefore never opens a `gs://` path itself here: SavedModels and
TensorBoard events are written locally and copied (`upload_tree`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath


def configure_emulator(environ=None) -> None:
  """Points tensorstore and epath at `STORAGE_EMULATOR_HOST`, when set.
  Settings the user made explicitly are kept."""
  env = os.environ if environ is None else environ
  host = env.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  if "://" not in host:
    host = f"http://{host}"
  env.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
  # Without it array_record's reader asks Google's servers and retries for
  # minutes: reading TFDS records from a bucket seems to hang.
  env.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)
  env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "storage-emulator")
  env.setdefault("EPATH_USE_TF", "false")
  # gcsfs would ask the emulator for a bucket's layout (a control-plane API it
  # does not serve) and log a warning on every access.
  env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  _uncached_listings()
  # epath decides once per process whether TensorFlow serves gs://; a URL
  # used before the variable was set (TFDS probes gs://tfds-data) would
  # have fixed that to TensorFlow's client.
  cached = getattr(getattr(epath, "gpath", None), "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()


def _uncached_listings() -> None:
  """gcsfs caches directory listings per process, so a step another process
  (or tensorstore, orbax's writer) added would stay invisible: list afresh."""
  import fsspec.config  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
  """`path` as an epath.Path: URLs as they are, local paths made absolute."""
  path = os.fspath(path)
  return epath.Path(path if is_url(path) else os.path.abspath(os.path.expanduser(path)))


def join(path, *parts) -> str:
  """`path / parts` as a string that orbax, TensorFlow and epath all take."""
  return os.fspath(as_path(path).joinpath(*parts))


def check_reachable(path, what: str = "--workdir", *, folder: bool = False) -> None:
  """A URL whose scheme epath does not know, or whose bucket does not exist,
  is an error naming it, before anything is built or compiled; so is a
  local file where a `folder` (a workdir) is wanted."""
  path = os.fspath(path)
  if not is_url(path):
    if folder and os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"{what}={path} is a file, not a directory: give a folder (a new "
                       "one is created).")
    return
  scheme, rest = path.split("://", 1)
  bucket = rest.split("/", 1)[0]
  if scheme == "gs":
    from jaxdml import extras  # pylint: disable=g-import-not-at-top
    extras.require("gcsfs", f"{what}={path}")
  try:
    found = bool(bucket) and epath.Path(f"{scheme}://{bucket}").exists()
  except NotImplementedError as error:
    raise ValueError(f"{what}={path}: {error}") from None
  except Exception as error:  # pylint: disable=broad-except  (auth, network: say which)
    raise ValueError(f"{what}={path}: cannot reach bucket {bucket!r} "
                     f"({type(error).__name__}: {error}). Check the URL and your "
                     "credentials (or STORAGE_EMULATOR_HOST for a local server).") from None
  if not found:
    raise ValueError(f"{what}={path}: bucket {scheme}://{bucket} does not exist. Create it "
                     f"(gcloud storage buckets create {scheme}://{bucket}) or fix the URL.")


def write_text_atomic(path, text: str) -> None:
  """Writes `path` (local or a URL) whole or not at all: a temporary file
  beside it, then a rename, so a reader never sees half of it."""
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(target)  # rename() refuses an existing target (a resumed run)


def upload_tree(local: str, destination, *, replace: bool, last: str | None = None) -> None:
  """Copies the local directory `local` into `destination` (a URL or a
  path); `replace`: what was there first goes. Files named `last` are
  written after all others: a reader that waits for that marker (TFDS's
  dataset_info.json) never sees a half-copied tree."""
  target = as_path(destination)
  if replace and target.exists():
    target.rmtree()
  deferred = []
  for root, _, files in os.walk(local):
    relative = os.path.relpath(root, local)
    folder = target if relative == "." else target / relative
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
      if name == last:
        deferred.append((os.path.join(root, name), folder / name))
      else:
        (folder / name).write_bytes(_read_bytes(os.path.join(root, name)))
  for source, copy in deferred:
    copy.write_bytes(_read_bytes(source))


def _read_bytes(local: str) -> bytes:
  with open(local, "rb") as f:
    return f.read()


def download_tree(source, local: str) -> None:
  """Copies the directory `source` (a URL) into the local directory `local`
  (walked level by level: epath refuses `**` globs on buckets)."""
  os.makedirs(local, exist_ok=True)
  for item in as_path(source).iterdir():
    target = os.path.join(local, item.name)
    if item.is_dir():
      download_tree(item, target)
    else:
      with open(target, "wb") as f:
        f.write(item.read_bytes())


class LocalCopy:
  """A local directory standing in for `path`: the path itself when local,
  else a temporary copy (`download=True`: filled from it) that `close`
  removes. TensorFlow reads and writes through it."""

  def __init__(self, path, *, download: bool):
    self.remote = is_url(path)
    if self.remote:
      self.local = tempfile.mkdtemp(prefix="jaxdml-")
      if download:
        download_tree(path, self.local)
    else:
      self.local = os.fspath(as_path(path))

  def close(self) -> None:
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
