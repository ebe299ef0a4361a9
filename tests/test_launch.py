"""Launch scripts: shell-checked, and their gcloud/srun calls as expected.

No TPU pod or SLURM cluster is reachable here, so fake `gcloud` and `srun`
executables on PATH record what the scripts would run.
"""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")


def fake_tool(bin_dir, name, log, exit_code_for_describe=1):
  path = bin_dir / name
  path.write_text(
      "#!/usr/bin/env bash\n"
      'args="$*"\n'
      f'printf "%s\\n" "{name} ${{args//$\'\\n\'/ }}" >> {log}\n'
      f'if [[ "$*" == *" describe "* ]]; then exit {exit_code_for_describe}; fi\n'
      "exit 0\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
  subprocess.run(["shellcheck", TPU, SLURM], check=True)


def run_tpu(tmp_path, *args, describe_exit=1):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  fake_tool(bin_dir, "gcloud", log, describe_exit)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  result = subprocess.run(["bash", TPU, *args], env=env, capture_output=True, text=True)
  calls = log.read_text().splitlines() if log.exists() else []
  return result, calls


def test_tpu_pod_creates_installs_and_runs_on_every_worker(tmp_path):
  result, calls = run_tpu(
      tmp_path, "--name=pod", "--zone=us-central2-b", "--type=v4-32",
      "--bucket=gs://bkt", "--config=configs/sketchy_rtl.py:demo", "--",
      "--config.batch_size=512")
  assert result.returncode == 0, result.stderr
  create = [c for c in calls if "tpu-vm create" in c]
  assert create and "--accelerator-type=v4-32" in create[0]
  ssh = [c for c in calls if "tpu-vm ssh" in c]
  assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
  assert "pip install" in ssh[0]
  assert "python -m jaxdml.main --config=configs/sketchy_rtl.py:demo" in ssh[1]
  assert "--workdir=gs://bkt/jaxdml/pod/sketchy_rtl" in ssh[1]
  assert "--config.batch_size=512" in ssh[1]


def test_tpu_pod_reuses_an_existing_slice(tmp_path):
  result, calls = run_tpu(
      tmp_path, "--name=pod", "--zone=z", "--type=v5p-8", "--bucket=gs://b",
      "--config=configs/sketchy_rtl.py", describe_exit=0)
  assert result.returncode == 0, result.stderr
  assert not [c for c in calls if "tpu-vm create" in c]


@pytest.mark.parametrize("missing", ["--zone=z", "--bucket=gs://b"])
def test_tpu_pod_names_a_missing_flag(tmp_path, missing):
  flags = ["--name=pod", "--zone=z", "--type=v4-8", "--bucket=gs://b", "--config=c.py"]
  flags.remove(missing)
  result, calls = run_tpu(tmp_path, *flags)
  assert result.returncode == 2 and missing.split("=")[0] in result.stderr
  assert not calls


def test_slurm_script_runs_jaxdml_under_srun(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  fake_tool(bin_dir, "srun", log)
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").symlink_to(shutil.which("python3"))
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(tmp_path / "venv"))
  result = subprocess.run(["bash", SLURM, "configs/sop_xbn.py", "/shared/w", "--config.seed=1"],
                          env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  (call,) = log.read_text().splitlines()
  assert "-m jaxdml.main --config=configs/sop_xbn.py --workdir=/shared/w --config.seed=1" in call
  assert "--gpu-bind=single:1" in call
