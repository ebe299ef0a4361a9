"""One command on a GPU or TPU box: what jaxdml reaches there, in one report.

    python -m jaxdml.device_check [--out=DIR] [--budget_s=450]
    python -m jaxdml.device_check --quick      # tiny models on CPU: the test suite's run

Writes `DIR/device_check.json` (every record) and `DIR/device_check.md` (the
tables) as it goes, so a run cut short still leaves its report:
- `jaxdml.bench`'s train step and inference for ResNet-50, ViT-S/16 and
  ShuffleNetV2 1.0x at 224 px, bfloat16 and float32, batch 128 and 256
  (images/s, MFU, memory);
- the same train step in PyTorch, eager and `torch.compile`, when torch is
  importable (`jaxdml/tools/torch_step.py`);
- cuDNN against XLA attention (ViT-S/16 shapes), where cuDNN traces;
- exact and ScaNN leave-one-out search at SOP size (60,502 x 512), and exact
  search beside the device's matmul + top-k over the same blocks;
- the SBIR demo end to end (`configs/sketchy_rtl.py:demo`: wall time, R@1).
Jobs run in priority order (the issue's targets first: bf16 at batch 256
against torch eager) and whatever would start after `--budget_s` is listed
as skipped, so the command fits the device time it is given.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback

from absl import app, flags

MODELS = ("resnet50", "vit_s16", "shufflenet_v2_x1_0")
QUICK_MODELS = ("resnet_tiny", "vit_tiny", "shufflenet_v2_tiny")
# One model of each newer family: its bf16 train and inference steps only
# (no torch, float32 or small-batch runs), so the plan keeps its budget.
BACKBONES = ("dinov2_vit_s14", "clip_vit_b16", "convnext_tiny")
QUICK_BACKBONES = ("dinov2_vit_tiny", "clip_vit_tiny", "convnext_test")
# Issue targets at batch 256, bf16: jaxdml's train step / torch eager, and MFU.
TARGET_SPEEDUP, TARGET_MFU = 1.3, 0.45


def define_flags():
  flags.DEFINE_string("out", "device_check", "Folder for device_check.json and .md.")
  flags.DEFINE_integer("budget_s", 450, "Start no job after this many seconds.")
  flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
  flags.DEFINE_bool("quick", False, "Tiny models, one step each: checks the script on CPU.")


def _config_path(name: str) -> str:
  """A shipped recipe's file (`jaxdml.config.recipe_path`)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.recipe_path(name.removesuffix(".py"))


def bench_config(model: str, quick: bool):
  """`configs/encoder_bench.py` for `model`; `quick` shrinks it to 32 px and
  the tiny `model` (the config asks the model registry for its pooling)."""
  from jaxdml import config as config_lib  # pylint: disable=g-import-not-at-top
  path = _config_path("encoder_bench.py")
  config = config_lib.load_config(path, f"model={model},smoke={quick}")
  if quick:
    config.model.name = model
  return config


def jax_job(model, measure, dtype, batch, quick, steps):
  def run():
    from jaxdml.tools import bench  # pylint: disable=g-import-not-at-top
    record, = bench.run(bench_config(model, quick), batch_sizes=[batch], measure=[measure],
                        steps=steps, warmup=0 if quick else 3, dtype=dtype)
    return {**record, "framework": "jaxdml", "model": model, "model_config": record["model"]}
  return (f"jaxdml {measure} {model} {dtype} b{batch}", run)


def torch_job(model, dtype, batch, compiled, quick, steps):
  def run():
    from jaxdml.tools import torch_step  # pylint: disable=g-import-not-at-top
    why = torch_step.available()
    if why:
      return {"skipped": why}
    return torch_step.time_train_step(
        model, batch_size=batch, image_size=32 if quick else 224, dtype=dtype,
        compiled=compiled, steps=steps, warmup=0 if quick else 3,
        compile_backend="eager" if quick else "inductor")
  kind = "torch.compile" if compiled else "torch eager"
  return (f"{kind} train_step {model} {dtype} b{batch}", run)


def attention_job(quick):
  def run():
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jaxdml.models import vit  # pylint: disable=g-import-not-at-top
    shape = (8, 17, 2, 16) if quick else (256, 197, 6, 64)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    cudnn = vit._cudnn_attention_traces(shape, shape, jnp.dtype(jnp.bfloat16))  # pylint: disable=protected-access
    ours = jax.jit(vit.attention)(q, k, v).astype(jnp.float32)
    xla = jax.jit(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla"))(q, k, v)
    return {"measurement": "attention", "shape": shape, "cudnn_used": bool(cudnn),
            "max_abs_diff_vs_xla": float(jnp.max(jnp.abs(ours - xla.astype(jnp.float32))))}
  return ("attention cuDNN vs XLA", run)


def search_job(backend, quick):
  def run():
    from jaxdml.tools import search_bench  # pylint: disable=g-import-not-at-top
    num, dim = (2000, 32) if quick else (60_502, 512)
    x, labels = search_bench.make_clustered(num, dim, seed=0)
    if backend == "limits":  # exact search beside the device's matmul + top-k
      timed = search_bench.time_matmul_limits(x, search_bench.leave_one_out_k(labels))
    else:
      timed = search_bench.time_backend(backend, x, labels)
    return {"measurement": "search", "num": num, "dim": dim, **timed}
  return (f"search {backend}", run)


def sbir_job(quick):
  def run():
    from jaxdml import config as config_lib, train  # pylint: disable=g-import-not-at-top
    config = config_lib.load_config(_config_path("sketchy_rtl.py"), "smoke" if quick else "demo")
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      results = train.train_and_evaluate(config, workdir)
      wall = time.perf_counter() - start
    return {"measurement": "sbir_demo", "config": "smoke" if quick else "demo",
            "total_steps": int(config.total_steps), "wall_s": wall,
            "recall@1": results.get("recall@1")}
  return ("SBIR demo end to end", run)


def plan(quick: bool, steps: int) -> list:
  """(name, thunk) jobs in priority order."""
  models = QUICK_MODELS if quick else MODELS
  big, small = (16, 8) if quick else (256, 128)
  steps = 1 if quick else steps
  jobs = []
  # --quick checks each kind of job once (each model family's train step),
  # to keep the test suite's run short; the full plan runs them all.
  others = models[:1] if quick else models
  for m in models:  # the targets first
    jobs += [jax_job(m, "train", "bfloat16", big, quick, steps)]
    if m in others:
      jobs += [torch_job(m, "bfloat16", big, False, quick, steps)]
  jobs += [torch_job(m, "bfloat16", big, True, quick, steps) for m in others]
  jobs += [jax_job(m, "inference", "bfloat16", big, quick, steps) for m in others]
  jobs += [attention_job(quick), search_job("exact", quick), search_job("scann", quick),
           search_job("limits", quick), sbir_job(quick)]
  # After the targets and before the float32 and batch-128 sweeps; half the
  # timed steps each (a median of 5 steps is steady on a GPU) for the budget.
  for m in QUICK_BACKBONES if quick else BACKBONES:
    jobs += [jax_job(m, "train", "bfloat16", big, quick, max(1, steps // 2))]
    if not quick:
      jobs += [jax_job(m, "inference", "bfloat16", big, quick, max(1, steps // 2))]
  if quick:  # one float32 and one smaller-batch run keep those paths checked
    return jobs + [jax_job(models[0], "train", "float32", small, quick, steps)]
  for m in models:
    jobs += [jax_job(m, "train", "float32", big, quick, steps),
             torch_job(m, "float32", big, False, quick, steps),
             jax_job(m, "inference", "float32", big, quick, steps)]
  for dtype in ("bfloat16", "float32"):
    for m in models:
      jobs += [jax_job(m, "train", dtype, small, quick, steps),
               jax_job(m, "inference", dtype, small, quick, steps)]
  return jobs


def run_jobs(jobs, budget_s: float, on_record=None) -> list:
  """Runs each job not started past the budget; an error is recorded, not raised."""
  start = time.perf_counter()
  records = []
  for name, thunk in jobs:
    elapsed = time.perf_counter() - start
    if elapsed > budget_s:
      record = {"skipped": f"over the {budget_s:.0f} s budget"}
    else:
      job_start = time.perf_counter()
      try:
        record = thunk()
      except Exception as e:  # pylint: disable=broad-except
        record = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
      record["job_s"] = time.perf_counter() - job_start
    records.append({"job": name, **record})
    if on_record:
      on_record(records)
  return records


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def _note(record) -> str:
  if "skipped" in record:
    return "skipped: " + record["skipped"]
  if "error" in record:
    return "error: " + record["error"].splitlines()[0][:200]
  return json.dumps({k: v for k, v in record.items() if k not in ("job", "job_s")})


def markdown(records, header: dict) -> str:
  """The report's tables: throughput per job, then the targets."""
  lines = [f"# jaxdml device check: {header['device_kind']} x{header['device_count']}", "",
           f"jax {header['jax_version']}, {header['date']}", "",
           "| job | images/s | MFU | step ms | memory GiB | note |", "|---|---|---|---|---|---|"]
  for r in records:
    if "images_per_sec" in r:
      memory = r.get("device_peak_bytes", r.get("executable_bytes_per_device"))
      lines.append(f"| {r['job']} | {r['images_per_sec']:.1f} | {_fmt(r.get('mfu'), '.1%')} | "
                   f"{r['step_time_ms']:.1f} | {_fmt(memory and memory / 2**30, '.2f')} | |")
    else:
      lines.append(f"| {r['job']} | | | | | {_note(r)} |")
  lines += ["", "Targets (batch 256 train step, bf16):", ""]
  for target in targets(records):
    lines.append(f"- {target}")
  return "\n".join(lines) + "\n"


def targets(records) -> list[str]:
  """jaxdml vs torch eager (>= 1.3x) and bf16 MFU (>= 45 %), per model measured."""
  found = {}
  for r in records:
    if "images_per_sec" in r and r.get("dtype") == "bfloat16" and r.get(
        "measurement") == "train_step":
      found[(r.get("framework"), r["model"], r["batch_size"])] = r
  out = []
  for (framework, model, batch), r in sorted(found.items()):
    if framework != "jaxdml":
      continue
    torch_r = found.get(("torch eager", model, batch))
    speedup = torch_r and r["images_per_sec"] / torch_r["images_per_sec"]
    versus = "no torch eager run (MFU only)" if model in BACKBONES + QUICK_BACKBONES else (
        f"{_fmt(speedup, '.2f')}x torch eager (target {TARGET_SPEEDUP}x: "
        f"{'met' if speedup and speedup >= TARGET_SPEEDUP else 'NOT met'})")
    out.append(f"{model} b{batch}: {versus}, "
               f"MFU {r['mfu']:.1%} (target {TARGET_MFU:.0%}: "
               f"{'met' if r['mfu'] >= TARGET_MFU else 'NOT met'})")
  return out


def main(argv):
  del argv
  quick, out = flags.FLAGS.quick, flags.FLAGS.out
  header = header_for(quick)
  if header["platform"] == "cpu" and not quick:
    print("No accelerator: this is a CPU. Full checks take hours here; use --quick.", flush=True)

  def write(records):
    write_report(out, header, records)
    print(json.dumps({k: v for k, v in records[-1].items() if k != "traceback"}), flush=True)

  records = run_jobs(plan(quick, flags.FLAGS.steps), flags.FLAGS.budget_s, on_record=write)
  print(markdown(records, header), flush=True)


def header_for(quick: bool) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform,
          "device_count": jax.device_count(), "jax_version": jax.__version__,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick}


def write_report(out: str, header: dict, records: list) -> None:
  """`out/device_check.json` and `out/device_check.md`, rewritten after every job."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump({"header": header, "records": records}, f, indent=1)
  with open(os.path.join(out, "device_check.md"), "w") as f:
    f.write(markdown(records, header))


if __name__ == "__main__":
  define_flags()
  app.run(main)
