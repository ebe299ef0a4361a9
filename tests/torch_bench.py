"""PyTorch side of docs/benchmarks.md: the anchor's step, timed as jaxdml.bench times its own.

    python tests/torch_bench.py [--steps=10] resnet50 vit_s16 shufflenet_v2_x1_0

Models and loss come from ../shared/anchors/torch_train_step.py (ResNet-50,
ViT-S/16) and jaxdml/tools/torch_reference.py (torchvision's ShuffleNetV2 x1.0 with
a 512-d projection). Each step is timed on its own and the median reported,
after 3 warm-up steps; the anchor script's mean of 4 steps after 2 swung by
a third between runs here. Needs torch (the `test` extra), not jaxdml.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHOR = os.path.join(HERE, "..", "..", "shared", "anchors", "torch_train_step.py")


def anchor_definitions() -> dict:
  """The anchor's classes and loss, without running its timing loop."""
  namespace = {}
  with open(ANCHOR) as f:
    exec(f.read().split("\nbs = 16")[0], namespace)  # pylint: disable=exec-used
  return namespace


def build(name: str, anchor: dict) -> torch.nn.Module:
  if name == "shufflenet_v2_x1_0":
    sys.path.insert(0, HERE)
    from jaxdml.tools import torch_reference  # pylint: disable=g-import-not-at-top
    model = torch_reference.shufflenet(name)
    model.fc = torch.nn.Linear(1024, 512)
    return model
  return anchor["ViT"]() if name == "vit_s16" else anchor["resnet50"](512)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("models", nargs="+", choices=["resnet50", "vit_s16", "shufflenet_v2_x1_0"])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  anchor = anchor_definitions()
  batch = 16
  for name in args.models:
    model = build(name, anchor)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.arange(batch) // 4

    def step():
      opt.zero_grad()
      anchor["triplet"](model(x), y).backward()
      opt.step()

    for _ in range(3):
      step()
    seconds = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step()
      seconds.append(time.perf_counter() - start)
    print(json.dumps({"framework": "torch", "model": name, "threads": args.threads,
                      "images_per_sec": batch / float(np.median(seconds)),
                      "step_time_ms_range": [1e3 * min(seconds), 1e3 * max(seconds)]}),
          flush=True)


if __name__ == "__main__":
  main()
