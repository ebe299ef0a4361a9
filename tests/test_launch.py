"""Launch scripts: shell-checked, and their gcloud/srun calls as expected.

No TPU pod or SLURM cluster is reachable here, so fake `gcloud` and `srun`
executables on PATH record what the scripts would run, and multi-host
start-up is checked in simulated environments: SLURM and GKE variables, and
a local GCE metadata server for a gcloud TPU VM slice.
"""

import http.server
import os
import shlex
import shutil
import stat
import subprocess
import threading

import pytest

from jaxdml import sharding

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
  # Every GPU of the node visible to each task: JAX picks SLURM_LOCALID's.
  assert "--gpu-bind=none" in call and "single:1" not in call


def test_tpu_pod_dry_run_sends_the_gs_workdir_to_every_worker_unchanged(tmp_path):
  result, calls = run_tpu(tmp_path, "--name=pod", "--zone=z", "--type=v4-32",
                          "--bucket=gs://bkt/sub/", "--config=configs/sop_xbn.py:smoke",
                          "--dry_run", "--", "--config.seed=3")
  assert result.returncode == 0, result.stderr
  printed = result.stdout.splitlines()
  train = [shlex.split(line) for line in printed if "jaxdml.main" in line]
  assert len(train) == 1 and "--worker=all" in train[0]
  # What each worker's shell runs, unquoted as that shell will.
  (remote,) = [a.split("=", 1)[1] for a in train[0] if a.startswith("--command=")]
  remote_args = shlex.split(remote)
  assert "--workdir=gs://bkt/sub/jaxdml/pod/sop_xbn" in remote_args
  assert "--config=configs/sop_xbn.py:smoke" in remote_args and "--config.seed=3" in remote_args
  assert not [c for c in calls if "ssh" in c or "create" in c], "dry run ran nothing"


# --- multi-host start-up in simulated environments --------------------------

class _Metadata(http.server.BaseHTTPRequestHandler):
  """A GCE metadata server: what a gcloud TPU VM's workers ask for."""
  endpoints = ""

  def do_GET(self):  # pylint: disable=invalid-name
    key = self.path.rsplit("/", 1)[-1]
    values = {"worker-network-endpoints": self.endpoints, "agent-worker-number": "1"}
    if self.headers.get("Metadata-Flavor") != "Google" or key not in values:
      self.send_response(404)
      self.end_headers()
      return
    body = values[key].encode()
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    del args


@pytest.fixture
def metadata_server():
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"127.0.0.1:{server.server_port}"
  server.shutdown()
  server.server_close()


@pytest.mark.parametrize("endpoints,hosts", [
    ("t1v-n-0-w-0:0:10.0.0.2,t1v-n-0-w-1:1:10.0.0.3,t1v-n-0-w-2:2:10.0.0.4", 3),
    ("t1v-n-0-w-0:0:10.0.0.2", 1)])
def test_a_gcloud_tpu_slice_of_several_hosts_starts_jax_distributed(
    metadata_server, monkeypatch, endpoints, hosts):
  """A gcloud TPU VM sets no cluster variable: only its metadata server lists
  the slice's hosts. jaxdml asks it and lets JAX's own TPU detection, reading
  the same server, find the coordinator and the process count."""
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  _Metadata.endpoints = endpoints
  env = {"GCE_METADATA_IP": metadata_server}
  monkeypatch.setenv("GCE_METADATA_IP", metadata_server)
  monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: True)
  assert sharding.tpu_slice_hosts(env) == hosts
  assert sharding.distributed_init_args(env) == ({} if hosts > 1 else None)
  assert cloud_tpu_cluster.GceTpuCluster.get_process_count() == hosts
  assert sharding.distributed_init_args(dict(env, JAXDML_NO_DISTRIBUTED="1")) is None
  # Off a TPU VM the metadata server is never asked.
  monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: False)
  assert sharding.tpu_slice_hosts(env) == 1


@pytest.mark.parametrize("env,expected", [
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, {}),  # GKE TPU slice
    ({"TPU_WORKER_HOSTNAMES": "w-0"}, None),  # one host: nothing to start
    ({"SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}, {}),  # all GPUs visible: JAX picks 3
    ({"SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"},
     {"local_device_ids": [0]}),  # srun --gpu-bind=single:1: its one GPU is device 0
    ({"SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}),
    ({}, None)])
def test_distributed_start_up_follows_the_launcher(env, expected, monkeypatch):
  monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: False)
  assert sharding.distributed_init_args(env) == expected


def test_jax_and_jaxdml_agree_on_the_slurm_device():
  """Under the shipped script (every GPU visible) JAX's SLURM cluster asks
  for device SLURM_LOCALID, and jaxdml adds nothing that contradicts it."""
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top
  env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
         "SLURM_STEP_NODELIST": "gpu[01-02]"}
  saved = dict(os.environ)
  try:
    os.environ.update(env)
    assert slurm_cluster.SlurmCluster.is_env_present()
    assert slurm_cluster.SlurmCluster.get_local_process_id() == 3
    assert slurm_cluster.SlurmCluster.get_process_id() == 11
  finally:
    os.environ.clear()
    os.environ.update(saved)
  assert sharding.distributed_init_args(env) == {}
