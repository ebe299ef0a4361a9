"""`jaxdml.device_check --quick`: every job of the GPU/TPU check runs here on tiny models."""
import json

import pytest

from jaxdml.tools import device_check

# One job of each kind (~35 s here). The whole quick plan adds ViT, ShuffleNet,
# float32 and the SBIR demo (~140 s under the test suite's load): it runs in
# the slow suite, to keep CI near 15 minutes.
ONE_OF_EACH_KIND = (
    "jaxdml train resnet_tiny bfloat16 b16", "torch eager train_step resnet_tiny bfloat16 b16",
    "torch.compile train_step resnet_tiny bfloat16 b16", "attention cuDNN vs XLA",
    "search exact", "search scann", "search limits")


def run_and_check(jobs, tmp_path):
  """Runs `jobs`, checks each record by its kind, and writes and reads back the report."""
  records = device_check.run_jobs(jobs, budget_s=1e9)
  errors = {r["job"]: r["error"] for r in records if "error" in r}
  assert not errors, errors
  assert [r["job"] for r in records] == [name for name, _ in jobs]
  by_name = {r["job"]: r for r in records}
  frameworks = {r.get("framework") for r in records}
  assert {"jaxdml", "torch eager", "torch.compile"} <= frameworks  # torch: the test extra
  assert all(0 < r["mfu"] <= 1 for r in records if "mfu" in r)
  exact, scann = by_name["search exact"], by_name["search scann"]
  assert exact["recall@1"] > 0 and abs(scann["recall@1"] - exact["recall@1"]) < 0.05
  limits = by_name["search limits"]
  # 2,000 queries are one block: each anchor timed over the whole set.
  assert limits["k"] >= 8 and limits["block"] == limits["num"] == 2000
  assert all(limits[f"{name}_seconds"] >= 0 for name in (
      "exact", "blas_matmul_top_k", "xla_matmul_top_k", "xla_matmul_only"))
  assert by_name["attention cuDNN vs XLA"]["max_abs_diff_vs_xla"] < 1e-2
  header = device_check.header_for(quick=True)
  device_check.write_report(str(tmp_path), header, records)
  saved = json.loads((tmp_path / "device_check.json").read_text())
  assert len(saved["records"]) == len(records)
  table = (tmp_path / "device_check.md").read_text()
  assert "| jaxdml train resnet_tiny bfloat16 b16 |" in table
  assert "resnet_tiny b16:" in table and "x torch eager" in table
  return records


def test_device_check_runs_one_job_of_each_kind_and_writes_its_report(tmp_path):
  jobs = [job for job in device_check.plan(quick=True, steps=1) if job[0] in ONE_OF_EACH_KIND]
  assert len(jobs) == len(ONE_OF_EACH_KIND)
  run_and_check(jobs, tmp_path)


@pytest.mark.slow
def test_quick_device_check_runs_every_job_and_writes_its_report(tmp_path):
  records = run_and_check(device_check.plan(quick=True, steps=1), tmp_path)
  jobs = {r["job"]: r for r in records}
  assert {r["dtype"] for r in records if r.get("framework") == "jaxdml"} == {
      "bfloat16", "float32"}
  assert 0 <= jobs["SBIR demo end to end"]["recall@1"] <= 1


def test_jobs_past_the_budget_are_listed_as_skipped():
  ran = []
  jobs = [(f"job {i}", lambda i=i: ran.append(i) or {"value": i}) for i in range(3)]
  records = device_check.run_jobs(jobs, budget_s=-1)
  assert ran == [] and all(r["skipped"].startswith("over the") for r in records)
  records = device_check.run_jobs(jobs + [("broken", lambda: 1 / 0)], budget_s=1e9)
  assert ran == [0, 1, 2] and records[-1]["error"].startswith("ZeroDivisionError")


def test_plan_includes_one_model_of_each_newer_family():
  """DINOv2, CLIP and ConvNeXt: bf16 train and inference on the GPU plan,
  the train step of their test-sized models in --quick."""
  full = [name for name, _ in device_check.plan(quick=False, steps=10)]
  for model in ("resnet50", "vit_s16", "dinov2_vit_s14", "clip_vit_b16", "convnext_tiny"):
    assert f"jaxdml train {model} bfloat16 b256" in full
    assert f"jaxdml inference {model} bfloat16 b256" in full
  quick = [name for name, _ in device_check.plan(quick=True, steps=1)]
  for model in ("dinov2_vit_tiny", "clip_vit_tiny", "convnext_test"):
    assert f"jaxdml train {model} bfloat16 b16" in quick


@pytest.mark.parametrize("model,pooling,embed_dim", [
    ("dinov2_vit_s14", "cls", None), ("clip_vit_b16", "cls", None), ("vit_s16", "cls", None),
    ("convnext_tiny", "avg", 512), ("resnet50", "avg", 512)])
def test_bench_config_pools_as_the_registry_says(model, pooling, embed_dim):
  """A ViT by any name (dinov2_*, clip_*) pools its CLS token without an extra
  projection; a CNN average-pools into a 512-d head. --quick keeps the
  family: its test-sized model."""
  config = device_check.bench_config(model, quick=False)
  assert (config.model.name, config.model.pooling, config.model.embed_dim) == (
      model, pooling, embed_dim)
  tiny = {"dinov2_vit_s14": "dinov2_vit_tiny", "clip_vit_b16": "clip_vit_tiny",
          "vit_s16": "vit_tiny", "convnext_tiny": "convnext_test", "resnet50": "resnet_tiny"}
  quick = device_check.bench_config(tiny[model], quick=True)
  assert (quick.model.name, quick.model.pooling) == (tiny[model], pooling)


def test_quick_clip_train_step_runs():
  """The CLIP tower (CLS pooling through its projection, CLIP's statistics
  not set: the bench times the network) through the bench's train step."""
  jobs = [job for job in device_check.plan(quick=True, steps=1)
          if job[0] == "jaxdml train clip_vit_tiny bfloat16 b16"]
  record, = device_check.run_jobs(jobs, budget_s=1e9)
  assert "error" not in record, record
  assert record["images_per_sec"] > 0 and record["model_config"]["pooling"] == "cls"


def test_targets_of_a_model_without_a_torch_run_report_mfu_only():
  record = {"images_per_sec": 100.0, "dtype": "bfloat16", "measurement": "train_step",
            "framework": "jaxdml", "batch_size": 256, "mfu": 0.5}
  lines = device_check.targets([{**record, "model": "dinov2_vit_s14"},
                                {**record, "model": "resnet50"}])
  assert lines[0] == ("dinov2_vit_s14 b256: no torch eager run (MFU only), "
                      "MFU 50.0% (target 45%: met)")
  assert lines[1].startswith("resnet50 b256: -x torch eager (target 1.3x: NOT met)")
