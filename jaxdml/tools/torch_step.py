"""PyTorch's side of `jaxdml.device_check`: the same encoders and train step, eager and compiled.

The models are `jaxdml.tools.torch_reference`'s (torchvision and timm
layouts in plain torch.nn, the ones the parity tests check jaxdml's
encoders against), so this needs torch; nothing else in jaxdml imports it.
The step is `configs/encoder_bench.py`'s: a 512-d projection (ViT: its 384-d
CLS token), L2, batch-all triplet loss (margin 0.2), AdamW (lr 1e-4,
weight decay 0.01). bfloat16 runs under autocast; float32 allows TF32, what
JAX's default matmul precision uses on the same GPU. CNNs run channels-last
on GPU (cuDNN's fast layout). Timed as `jaxdml.bench` times: median of
individually synchronised steps after warm-up steps.
"""
from __future__ import annotations

import contextlib
import importlib.util
import time

import numpy as np


def available() -> str | None:
  """None when the torch comparison can run here, else why not."""
  if importlib.util.find_spec("torch") is None:
    return "torch is not installed"
  return None


def _reference():
  from jaxdml.tools import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference


def build(name: str):
  """The torch encoder `name` (jaxdml's model names), ending in its embedding."""
  import torch  # pylint: disable=g-import-not-at-top
  ref = _reference()
  if name == "resnet50":
    model = ref.resnet("resnet50")
    model.fc = torch.nn.Linear(2048, 512)
  elif name == "resnet_tiny":
    model = ref.ResNet(ref.BasicBlock, [1, 1, 1, 1])
    model.fc = torch.nn.Linear(512, 16)
  elif name == "shufflenet_v2_x1_0":
    model = ref.shufflenet(name)
    model.fc = torch.nn.Linear(1024, 512)
  elif name == "shufflenet_v2_tiny":
    model = ref.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128])
    model.fc = torch.nn.Linear(128, 16)
  elif name == "vit_s16":
    model = ref.VisionTransformer(embed_dim=384, depth=12, num_heads=6)
    model.head = torch.nn.Identity()
  elif name == "vit_tiny":
    model = ref.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model.head = torch.nn.Identity()
  else:
    raise ValueError(f"no torch model for {name!r}.")
  return model


def triplet_loss(embeddings, labels, margin: float = 0.2):
  """Batch-all triplet loss on L2-normalised embeddings, mean over the active triplets."""
  import torch  # pylint: disable=g-import-not-at-top
  e = torch.nn.functional.normalize(embeddings.float())
  d = torch.cdist(e, e)
  same = labels[:, None] == labels[None]
  eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
  valid = (same & ~eye)[:, :, None] & ~same[:, None, :]
  losses = torch.relu(d[:, :, None] - d[:, None, :] + margin) * valid
  return losses.sum() / (losses > 0).sum().clamp(min=1)


def time_train_step(name: str, *, batch_size: int, image_size: int, dtype: str, compiled: bool,
                    steps: int, warmup: int, compile_backend: str = "inductor") -> dict:
  """Images/s of the torch train step (median of `steps` synchronised steps)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  model = build(name).to(device)
  x = torch.randn(batch_size, 3, image_size, image_size, device=device)
  if device == "cuda" and not name.startswith("vit"):
    model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
  labels = torch.arange(batch_size, device=device) // 2
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  forward = torch.compile(model, backend=compile_backend) if compiled else model
  autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16"
              else contextlib.nullcontext())
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = triplet_loss(forward(x), labels)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  start = time.perf_counter()
  step()  # compiles when compiled
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  record = {
      "framework": "torch.compile" if compiled else "torch eager", "measurement": "train_step",
      "model": name, "dtype": dtype, "batch_size": batch_size, "image_size": image_size,
      "images_per_sec": batch_size / float(np.median(seconds)),
      "step_time_ms": 1e3 * float(np.median(seconds)), "first_step_s": first_s,
      "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
      "torch_version": torch.__version__}
  if compiled:
    record["compile_backend"] = compile_backend
  if device == "cuda":
    record["device_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  return record
