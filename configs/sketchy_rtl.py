"""SBIR on Sketchy: two towers, BatchNorm embeddings, Relative Triplet Loss.

Seddati et al. 2023 (arXiv 2305.18988), PAPERS.md section 1. Headline:
instance R@1 = 62.38 % on the Sketchy test photos (sketch -> its own photo).

    # Real data (prepare it once: python -m jaxdml.data_prep.build sketchy ...):
    python -m jaxdml.main --config=configs/sketchy_rtl.py --workdir=workdirs/sketchy
    # Embedded synthetic data, a small real model, a few minutes on a CPU:
    python -m jaxdml.main --config=configs/sketchy_rtl.py:demo --workdir=workdirs/demo
    # Seconds, for tests:
    python -m jaxdml.main --config=configs/sketchy_rtl.py:smoke --workdir=/tmp/smoke

Arguments: `ablation=triplet` (plain triplet, RTL weighting off),
`embedding=l2` (L2-normalised embedding instead of BatchNorm), `seed=N`.

No code is public. Our choices where the paper is silent: sketch tower ViT-S/16,
photo tower ViT-B/16 (the photo side needs more capacity; both CLS-pooled),
512-d linear projection + BatchNorm, semi-hard in-batch mining on Euclidean
distance with margin 0.2 * sqrt(512) (BN outputs have unit variance per
dimension, so distances scale with sqrt(dim)), AdamW 1e-4 with warmup + cosine.
"""

import ml_collections

from jaxdml import config as config_lib
from jaxdml import recipes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, demo=False, ablation="rtl",
                             embedding="bn", seed=0)
  if arg.ablation not in ("rtl", "triplet"):
    raise ValueError(f"ablation={arg.ablation!r}: expected 'rtl' or 'triplet'.")
  if arg.embedding not in ("bn", "l2"):
    raise ValueError(f"embedding={arg.embedding!r}: expected 'bn' or 'l2'.")
  c = recipes.loop(seed=arg.seed, task="sbir", batch_size=64, total_steps=30_000,
                   log_every=50, eval_every=2_000)

  embed_dim = 512
  head = dict(embed_dim=embed_dim, head_norm=arg.embedding, dtype="auto")
  # init_file: ImageNet weights per tower (e.g. timm's ViT-S/16 and ViT-B/16).
  c.model = ml_collections.ConfigDict(dict(
      name="two_tower",
      query=dict(name="vit_s16", pooling="cls", init_file=None, **head),
      gallery=dict(name="vit_b16", pooling="cls", init_file=None, **head)))

  c.loss = ml_collections.ConfigDict(dict(
      name="relative_triplet", margin=0.2,
      # BatchNorm embeddings are compared as they are, not L2-normalised
      # first (PML's LpDistance default); the L2 ablation's are unit already.
      distance=dict(name="euclidean", normalize_embeddings=False),
      mining="semihard",
      weighting="anchor_dissimilarity" if arg.ablation == "rtl" else "none"))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, weight_decay=0.05, schedule="warmup_cosine",
      warmup_steps=1_000, grad_clip_norm=1.0))

  c.data = recipes.default_data_config()
  c.data.name = "sketchy"
  c.data.image_size = 224

  c.evals = ml_collections.ConfigDict({"retrieval": recipes.retrieval_eval(
      ks=(1, 5, 10), backend="exact", batch_size=256,
      similarity="euclidean" if arg.embedding == "bn" else "cosine", picture=True)})
  c.memory = ml_collections.ConfigDict(dict(size=0))

  size = "smoke" if arg.smoke else "demo" if arg.demo else ""
  if size:
    # Embedded data and a small real CNN pair: a few minutes on a 2-core CPU
    # (demo), seconds (smoke). One overlay, applied last.
    embed_dim = 16 if arg.smoke else 128
    tower = lambda: dict(name="resnet_tiny" if arg.smoke else "resnet_small",
                         embed_dim=embed_dim, head_norm=arg.embedding, pooling="avg",
                         dtype="auto")
    overlay = {"data.name": "synthetic_sketchy", "data.augment.random_resized_crop": False,
               "model.query": tower(), "model.gallery": tower()}
    if arg.smoke:
      overlay.update({
          "data.image_size": 32,
          "data.synthetic": dict(num_categories=4, photos_per_category=6,
                                 sketches_per_photo=2, test_photos_per_category=2,
                                 image_size=32),
          **recipes.smoke_cadence(c), "optimizer.warmup_steps": 1})
    else:
      overlay.update({
          "data.image_size": 64, "evals.retrieval.batch_size": 128, "batch_size": 48,
          "total_steps": 400, "log_every": 20, "eval_every": 200, "checkpoint_every": 200,
          "optimizer.lr": 1e-3, "optimizer.warmup_steps": 40})
    recipes.apply_overlay(c, overlay)
  # BN embeddings have unit variance per dimension: scale the margin with
  # sqrt(dim). L2 embeddings live on the unit sphere: the margin as is.
  if arg.embedding == "bn":
    c.loss.margin = 0.2 * embed_dim ** 0.5
  return c
