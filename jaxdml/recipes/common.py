"""Shared pieces of the recipes in `configs/`.

Every recipe file stays a short `get_config(arg)`; what CUB, Cars, SOP,
In-Shop and DeepFashion2 recipes have in common (data set, evaluation
protocol, the `smoke` and `demo` shrinking onto the embedded data) lives here
once. Numbers are the papers' (`PAPERS.md`); each recipe file says which.
"""

from __future__ import annotations

import ml_collections

from jaxdml.config import datasets, default_data_config


def evaluator(type_name: str, **settings) -> dict:
  """A `config.evals` entry with every setting of its type spelt out, so
  `--config.evals.NAME.X=` has a field to set."""
  from jaxdml import evaluators  # pylint: disable=g-import-not-at-top  (light: no JAX)
  return {**evaluators.settings_of(type_name), **settings}


def retrieval_eval(**settings) -> dict:
  """`config.evals` entry of the data set's own retrieval protocol."""
  return evaluator("retrieval", **settings)


def loop(*, seed: int, task: str, batch_size: int, total_steps: int, log_every: int,
         eval_every: int) -> ml_collections.ConfigDict:
  """The fields every recipe sets: task, cadence, devices."""
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.task = task
  c.batch_size = batch_size
  c.total_steps = total_steps
  c.log_every = log_every
  c.eval_every = eval_every
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 3
  c.mesh = ml_collections.ConfigDict({"data": -1})
  c.sharding = "replicated"
  c.epoch_steps = 0  # steps per epoch; epoch-based parts need it (tasks.progress)
  # Weighted terms added to the ranking loss, name -> {weight, **hparams}:
  # distillation (losses that consume the teacher) and regularisers.
  c.terms = ml_collections.ConfigDict()
  return c


def single_task(dataset: str, *, seed: int = 0) -> ml_collections.ConfigDict:
  """A ResNet-50 single-encoder recipe on `dataset`, to be specialised."""
  if dataset not in datasets.CATALOGUE:
    raise ValueError(f"dataset={dataset!r}: expected one of {sorted(datasets.CATALOGUE)}.")
  entry = datasets.CATALOGUE[dataset]
  c = loop(seed=seed, task="single", batch_size=64, total_steps=35_000,
           log_every=100, eval_every=5_000)
  c.model = ml_collections.ConfigDict(dict(
      name="resnet50", embed_dim=128, pooling="avg", head_norm="l2", init_file=None,
      dtype="auto"))
  c.loss = ml_collections.ConfigDict(dict(name="contrastive", distance="cosine",
                                          pos_margin=1.0, neg_margin=0.5))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, weight_decay=5e-4, schedule="constant", warmup_steps=0,
      grad_clip_norm=None))
  c.data = default_data_config()
  c.data.name = dataset
  c.data.image_size = 224
  c.data.m_per_class = 4
  c.evals = ml_collections.ConfigDict({"retrieval": retrieval_eval(
      ks=entry.eval_ks, backend=entry.backend, batch_size=256, similarity="cosine",
      picture=True)})
  # loss_form: "joint" (one reduction over batch + memory pairs) or "xbm"
  # (XBM's batch term + weight * memory term); see jaxdml.memory.loss_with_memory.
  c.memory = ml_collections.ConfigDict(dict(size=0, start_step=0, adapt="none",
                                            adapt_hparams={}, loss_form="joint", weight=1.0))
  return c


def use_xbm_loss(c: ml_collections.ConfigDict) -> None:
  """The contrastive loss as XBM's code computes it (IRT's equation too).

  Per-anchor sums of 1 - s over positives and [s - 0.5]_+ over negatives,
  averaged over anchors; the batch term plus the memory term of weight 1,
  the batch enqueued first (`jaxdml.memory.loss_with_memory`, "xbm").
  """
  c.loss.reduction = "per_anchor_sum"
  c.memory.loss_form = "xbm"
  c.memory.weight = 1.0


SMOKE_CADENCE = {"batch_size": 8, "total_steps": 2, "log_every": 1, "eval_every": 0,
                 "checkpoint_every": 2}


def smoke_cadence(c: ml_collections.ConfigDict) -> dict:
  """Two steps of batch 8, logged each step, checkpointed at the end, every
  evaluator embedding batches of 16: the overlay of `:smoke` runs."""
  return {**SMOKE_CADENCE, **for_every_evaluator(c, batch_size=16)}


def for_every_evaluator(c: ml_collections.ConfigDict, **settings) -> dict:
  """`{"evals.NAME.key": value}` overlay entries for every evaluator of `c`."""
  return {f"evals.{name}.{key}": value for name in c.get("evals", {})
          for key, value in settings.items()}


def apply_overlay(c: ml_collections.ConfigDict, overlay: dict) -> ml_collections.ConfigDict:
  """Sets each `"a.b.c": value` of `overlay` on `c` (what `:smoke`/`:demo` do)."""
  for path, value in overlay.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def embedded_overlay(c: ml_collections.ConfigDict, *, smoke: bool) -> dict:
  """The fields `:smoke` or `:demo` change to move a recipe onto the
  embedded synthetic set (photos, category labels).

  `smoke`: a tiny network for tests (seconds). Otherwise `demo` size: a small
  real CNN at 64 px that learns in minutes on a CPU. Memory sizes and start
  steps shrink with the run; the ratios of the paper's settings are kept
  where they matter (memory several times the batch).
  """
  overlay = {
      "data.name": "synthetic_sketchy",
      # Category retrieval on a few hundred photos overfits without augmentation.
      "data.augment.scale": (0.5, 1.0),
      **for_every_evaluator(c, backend="exact", ks=(1, 2, 4, 8)),
  }
  if smoke:
    overlay.update({
        "model.name": "resnet_tiny", "model.embed_dim": 16, "data.image_size": 32,
        "data.synthetic": dict(num_categories=4, photos_per_category=6, sketches_per_photo=1,
                               test_photos_per_category=2, image_size=32),
        "data.m_per_class": 2, **smoke_cadence(c)})
    if c.memory.size:
      overlay.update({"memory.size": 24, "memory.start_step": 1})
    return overlay
  overlay.update({
      "model.name": "resnet_small", "data.image_size": 64,
      # SOP-like: many classes of ~4 images (a photo and its 3 sketches).
      "data.single_labels": "instance",
      "data.synthetic": dict(num_categories=16, photos_per_category=24, sketches_per_photo=3,
                             test_photos_per_category=6, image_size=64),
      # From scratch, not fine-tuning a pretrained network: a larger step.
      "optimizer.lr": 1e-3, "batch_size": 16, "total_steps": 300, "log_every": 25,
      "eval_every": 150, "checkpoint_every": 150, **for_every_evaluator(c, batch_size=128)})
  if c.memory.size:
    overlay.update({"memory.size": 256, "memory.start_step": 50})
  return overlay


def on_embedded_data(c: ml_collections.ConfigDict, *, smoke: bool,
                     recipe: dict | None = None) -> ml_collections.ConfigDict:
  """Applies the embedded-data overlay, with the recipe's own fields for that
  size (`recipe`, same `"a.b": value` form) merged in: the last edit of the
  config, each field set once."""
  return apply_overlay(c, {**embedded_overlay(c, smoke=smoke), **(recipe or {})})
