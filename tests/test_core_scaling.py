"""benchmarks/core_scaling.py: its summary's arithmetic, and one real run of each kind."""
import pytest

from benchmarks import core_scaling, input_pipeline


def test_summary_normalises_each_round_by_its_own_single_independent_process():
  """The host drifts by 10-20 % between rounds: every rate is divided by
  the one-process rate of its own round before the median is taken."""
  rounds = [
      {("independent", 1): 100.0, ("independent", 2): 190.0, ("workers", 1): 100.0,
       ("workers", 2): 180.0},
      {("independent", 1): 50.0, ("independent", 2): 100.0, ("workers", 1): 45.0,
       ("workers", 2): 80.0},
      {("independent", 1): 80.0, ("independent", 2): 160.0, ("workers", 1): 80.0,
       ("workers", 2): 152.0},
  ]
  assert core_scaling.summary(rounds, [1, 2]) == {
      "workers x1 per core": 1.0, "independent x1 per core": 1.0, "workers/independent x1": 1.0,
      # 0.9, 0.8, 0.95 (normalised by the median one-process rate instead: 0.95)
      "workers x2 per core": 0.9, "independent x2 per core": 1.0,
      "workers/independent x2": 0.947}


def test_both_kinds_run_two_processes_on_real_jpegs(tmp_path):
  """Two workers under one training process, and two independent
  processes: each run times its batches and counts every process's CPU."""
  data_dir = input_pipeline.prepare_for(str(tmp_path), ["cub_obdsd.py"], 200)
  for kind in core_scaling.KINDS:
    record = core_scaling.run_kind(kind, 2, "cub_obdsd.py", data_dir, batch=8, steps=40)
    assert record["kind"] == kind and record["cores"] == 2
    assert record["images_per_sec"] > 0 and record["cpu_seconds_per_image"] > 0
    if kind == "workers":
      assert 0 < record["worker_busy"]["min"] <= record["worker_busy"]["max"] < 1.5


def test_a_process_that_fails_stops_the_run_with_its_exit_code(tmp_path):
  """No data set there: the first process raises before the barrier; the
  run ends with an error instead of waiting for it forever."""
  with pytest.raises(RuntimeError, match="independent x2 exited with 1"):
    core_scaling.run_kind("independent", 2, "cub_obdsd.py", str(tmp_path / "none"), 8, 2)
