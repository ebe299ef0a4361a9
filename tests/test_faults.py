"""Faults a user causes, injected one by one: what a run does, and what it
leaves in its workdir. Compared with an undisturbed run where one exists.

| fault | what happens |
|---|---|
| a second run on a held workdir | refused, the holder named; the first run's files as if alone |
| a lock left by a killed run | taken over, with a note |
| a refused or failed start | nothing written (config.json and all) |
| a line of metrics.jsonl cut short | set aside in a side file; the run resumes |
| a full disk | one line, the failed step and the path; the rerun resumes once space is freed |
| Ctrl-C once / twice | checkpoint and a clear line / stop at once, one line, exit 130 |
| SIGTERM during an evaluation | the evaluation abandoned, the step checkpointed, returns at once |
| --mode=eval on a read-only workdir | the metrics, and a warning about what was not written |
| only damaged checkpoints | the rule said; a rerun refuses until the user chooses |
| user errors on the command line | one or two lines, no traceback |
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdml import checkpoint, evaluators, metrics_writer, run_lock, train
from jaxdml import workdir as workdir_lib
from jaxdml.evaluators import base
from test_train import ROOT, evaluation, load_config, losses_of, short_run

ENV = {k: v for k, v in os.environ.items() if k != "JAXDML_TRACEBACK"}


def _start(workdir, flags, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "jaxdml.main", f"--workdir={workdir}", *flags],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=ENV, **kwargs)


def _wait_for_metrics(run, workdir, lines=1):
  path = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (path.exists() and len(path.read_text().splitlines()) >= lines):
    assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
    time.sleep(0.05)


def _steps(workdir):
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_first(tmp_path):
  config, flags = short_run(60, checkpoint_every=10)
  flags += ["--config.keep_checkpoints=3"]
  first = _start(tmp_path / "w", flags)
  _wait_for_metrics(first, tmp_path / "w")
  second = _start(tmp_path / "w", flags)
  _, err = second.communicate(timeout=300)
  assert second.returncode == 1 and "Traceback" not in err
  assert f"in use by another training run (pid {first.pid} on {socket.gethostname()}" in err
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  steps = [row["step"] for row in metrics_writer.read_metrics(str(tmp_path / "w"))]
  assert steps == list(range(1, 61))  # one writer: each step once, in order
  assert _steps(tmp_path / "w") == [40, 50, 60]  # keep_checkpoints held
  assert not (tmp_path / "w" / run_lock.LOCK_FILE).exists()  # given back


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
  lock_path = tmp_path / run_lock.LOCK_FILE
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  now = time.time()
  lock_path.write_text(json.dumps(dict(host=socket.gethostname(), pid=int(dead), started=now,
                                       heartbeat=now, token="old")))
  taker = run_lock.RunLock(str(tmp_path))
  assert f"pid {dead} on {socket.gethostname()}" in taker.acquire()
  with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
    run_lock.RunLock(str(tmp_path)).acquire()  # this process lives: not stale
  taker.release()
  assert not lock_path.exists()
  # Another host: stale once its heartbeat is old, not before.
  for age, taken in ((5, False), (1000, True)):
    lock_path.write_text(json.dumps(dict(host="elsewhere", pid=1, started=now - age,
                                         heartbeat=time.time() - age, token="other")))
    lock = run_lock.RunLock(str(tmp_path), stale_after_s=300)
    if taken:
      assert "elsewhere" in lock.acquire()
      lock.release()
    else:
      with pytest.raises(run_lock.WorkdirLockedError, match="elsewhere"):
        lock.acquire()
  # A lock cut short (a crash while writing it) is stale too.
  lock_path.write_text('{"host": "some')
  lock = run_lock.RunLock(str(tmp_path))
  assert "cut short" in lock.acquire()
  lock.release()


def test_a_holder_whose_lock_was_taken_over_knows_it(tmp_path):
  holder = run_lock.RunLock(str(tmp_path), heartbeat_s=0.05)
  holder.acquire()
  (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(dict(
      host="elsewhere", pid=1, started=0, heartbeat=time.time(), token="thief")))
  deadline = time.time() + 10
  while not holder.lost and time.time() < deadline:
    time.sleep(0.05)
  assert holder.lost
  holder.release()
  assert "thief" in (tmp_path / run_lock.LOCK_FILE).read_text()  # not ours to remove


def test_a_refused_or_failed_start_writes_nothing(tmp_path):
  config, _ = short_run(2, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
  other = load_config("sketchy_rtl.py")  # another model: the checkpoint does not fit
  evaluation(other, False)
  with pytest.raises(checkpoint.WrongModelError):
    train.train_and_evaluate(other, str(tmp_path / "run"))
  after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
  assert after == before  # config.json included: the healthy run is as it was
  missing = load_config("sketchy_rtl.py")
  missing.data.name, missing.data.data_dir = "sketchy", str(tmp_path / "no_data")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    train.train_and_evaluate(missing, str(tmp_path / "fresh"))
  assert not (tmp_path / "fresh").exists()


def test_a_metrics_line_cut_short_is_set_aside_and_the_run_resumes(tmp_path, capsys):
  config, _ = short_run(4, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path), stop_after=2)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "loss": 0.12')  # a kill during the write
  train.train_and_evaluate(config, str(tmp_path))
  assert "cut short by an interrupted write set aside" in capsys.readouterr().out
  [side] = list(tmp_path.glob("metrics.jsonl.torn-*"))
  assert side.read_text() == '{"step": 3, "loss": 0.12\n'
  plain = tmp_path / "plain"
  train.train_and_evaluate(config, str(plain))
  np.testing.assert_allclose(losses_of(str(tmp_path)), losses_of(str(plain)), rtol=1e-5)


def _unshare_works():
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
  except FileNotFoundError:
    return False


needs_namespaces = pytest.mark.skipif(not _unshare_works(),
                                      reason="needs unshare (user and mount namespaces)")


@needs_namespaces
def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_resumes(tmp_path):
  """A small tmpfs, mounted in a namespace of the test's own: the first
  checkpoint fits; a filler file then takes the space, the next save fails,
  the run stops at once, naming the cause; with the space freed the same
  command resumes from the last good checkpoint and ends like a run that
  never failed."""
  config, flags = short_run(6, checkpoint_every=2)
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  out.mkdir()
  command = " ".join([sys.executable, "-m", "jaxdml.main", f"--workdir={disk}/run", *flags])
  script = f"""
set -u
mount -t tmpfs -o size=64m tmpfs {disk}
{command} --config.total_steps=2 > /dev/null 2>&1 || exit 9
head -c $(( $(df --output=avail -B1 {disk} | tail -1) - 131072 )) /dev/zero > {disk}/filler 2>/dev/null
{command} > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
rm {disk}/filler
{command} > {out}/again.out 2> {out}/again.err; echo $? > {out}/again.rc
cp {disk}/run/metrics.jsonl {out}/
ls {disk}/run/checkpoints > {out}/steps
"""
  done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  err = (out / "full.err").read_text()
  assert (out / "full.rc").read_text().strip() == "1", err[-3000:]
  assert "Traceback" not in err and "No space left on device" in err
  assert f"step 4 to {disk}/run/checkpoints" in err and "resumes from step 2" in err
  assert (out / "again.rc").read_text().strip() == "0", (out / "again.err").read_text()[-3000:]
  assert "Resuming from" in (out / "again.out").read_text()
  # The same two commands on a disk with room.
  first = config.copy_and_resolve_references()
  first.total_steps = 2
  train.train_and_evaluate(first, str(tmp_path / "plain"))
  train.train_and_evaluate(config, str(tmp_path / "plain"))
  resumed = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
  np.testing.assert_allclose(resumed, losses_of(str(tmp_path / "plain")), rtol=1e-5)


def test_ctrl_c_checkpoints_once_and_stops_at_once_twice(tmp_path):
  config, flags = short_run(500, checkpoint_every=1000)
  run = _start(tmp_path / "once", flags)
  _wait_for_metrics(run, tmp_path / "once", lines=2)
  run.send_signal(signal.SIGINT)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-3000:]
  assert "SIGINT: stopped at step" in out and "Rerun the same command to resume" in out
  assert "Traceback" not in err
  [stopped] = _steps(tmp_path / "once")
  train.train_and_evaluate(config, str(tmp_path / "once"), stop_after=2)
  train.train_and_evaluate(config, str(tmp_path / "plain"), stop_after=stopped + 2)
  np.testing.assert_allclose(losses_of(str(tmp_path / "once")), losses_of(str(tmp_path / "plain")),
                             rtol=1e-5)
  # The second Ctrl-C comes while the run writes its stop checkpoint: the
  # keypress is injected at that moment (a signal sent from outside could
  # land after the run has already finished stopping).
  second_ctrl_c = (
      "import os, signal\n"
      "from jaxdml import checkpoint, main\n"
      "save = checkpoint.Checkpointer.save\n"
      "def ctrl_c_then_save(self, *args, **kwargs):\n"
      "  os.kill(os.getpid(), signal.SIGINT)\n"
      "  return save(self, *args, **kwargs)\n"
      "checkpoint.Checkpointer.save = ctrl_c_then_save\n"
      "main.run()\n")
  run = subprocess.Popen(
      [sys.executable, "-c", second_ctrl_c, f"--workdir={tmp_path / 'twice'}", *flags], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
  _wait_for_metrics(run, tmp_path / "twice", lines=2)
  run.send_signal(signal.SIGINT)
  out, err = run.communicate(timeout=300)
  assert run.returncode == 130 and "Traceback" not in err, err[-3000:]
  said = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]
  assert len(said) == 1 and "stopped by Ctrl-C" in said[0], said
  assert not (tmp_path / "twice" / "checkpoints").exists()
  assert not (tmp_path / "twice" / run_lock.LOCK_FILE).exists(), "the lock is given back"


class _SignalledMidway(base.Evaluator):
  """An evaluator that takes a SIGTERM after its first batch of embeddings."""

  def run(self, embed_fns, step):
    images = np.zeros((64, 32, 32, 3), np.uint8)
    calls = []

    def embed(x):
      calls.append(step)
      if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      return embed_fns["query"](x)
    self.batch_size = 8
    self.embed(embed, images)
    return {"never": 1.0}


def test_sigterm_during_an_evaluation_abandons_it_and_checkpoints_the_step(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluators, "_TYPES", dict(evaluators._TYPES))
  evaluators.register("signalled_midway", _SignalledMidway, {"batch_size": 8})
  config, _ = short_run(50, checkpoint_every=1000)
  config.evals = dict(slow=dict(type="signalled_midway", every=3))
  start = time.perf_counter()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert time.perf_counter() - start < 300
  assert results == {} and _steps(tmp_path) == [3]
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3] and not any("never" in r for r in rows)


@needs_namespaces
def test_eval_on_a_read_only_workdir_prints_its_metrics_and_warns(tmp_path):
  config, flags = short_run(2, checkpoint_every=2)
  config.evals.retrieval.enabled = True
  train.train_and_evaluate(config, str(tmp_path / "run"))
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  eval_flags = [f for f in flags if "enabled" not in f] + ["--mode=eval"]
  command = " ".join([sys.executable, "-m", "jaxdml.main", f"--workdir={tmp_path}/run",
                      *eval_flags])
  run = tmp_path / "run"
  done = subprocess.run(
      ["unshare", "-rm", "sh", "-c",
       f"mount --bind {run} {run} && mount -o remount,ro,bind {run} && {command}"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "recall@1" in done.stdout and "Warning: could not add the metrics" in done.stdout
  assert "Read-only file system" in done.stdout
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_only_damaged_checkpoints_refuse_a_rerun_until_the_user_chooses(tmp_path, capsys):
  config, _ = short_run(2, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  for array in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if array.is_file() and array.stat().st_size > 100 and array.parent.name != "state":
      array.write_bytes(array.read_bytes()[:20])  # truncated, as a disk error leaves it
  for attempt in range(2):  # the first sets the step aside, the second finds none left
    with pytest.raises(checkpoint.DamagedCheckpointsError) as error:
      train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "damaged steps [2]" in message and "delete" in message and "<" not in message
  assert "does not restore" in capsys.readouterr().out
  shutil.rmtree(tmp_path / "damaged_checkpoints")  # the user's choice: start over
  train.train_and_evaluate(config, str(tmp_path))
  assert _steps(tmp_path) == [2]


@pytest.mark.parametrize("args,says", [
    (["--config=configs/nope.py", "--workdir={tmp}/w"], "No recipe file 'configs/nope.py'"),
    (["--config=cub_obdsd:smoke", "--workdir={tmp}/w", "--config.optimizer.lrr=1"],
     "no field 'lrr' (did you mean 'lr'?)"),
    (["--config=cub_obdsd:smoke", "--workdir={tmp}/file"], "is a file, not a directory"),
    (["--config=sketchy_rtl", "--workdir={tmp}/w", "--config.data.data_dir={tmp}/none"],
     "python -m jaxdml.data_prep.build sketchy"),
])
def test_user_errors_are_one_or_two_lines_without_a_traceback(tmp_path, args, says):
  (tmp_path / "file").write_text("not a folder")
  argv = [a.format(tmp=tmp_path) for a in args]
  done = subprocess.run([sys.executable, "-m", "jaxdml.main", *argv], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and says in done.stderr
  assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 4
  assert not (tmp_path / "w").exists()
  shown = subprocess.run([sys.executable, "-m", "jaxdml.main", *argv], cwd=ROOT,
                         env=dict(ENV, JAXDML_TRACEBACK="1"), capture_output=True, text=True,
                         timeout=300)
  if "FATAL" not in done.stderr:  # flag parsing errors have no traceback to show
    assert "Traceback" in shown.stderr
