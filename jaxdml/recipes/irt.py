"""IRT recipes (PAPERS.md section 5): `configs/{sop,cub,inshop}_irt.py`.

El-Nouby et al. 2021. DeiT-S, the L2-normalised CLS token as the 384-d
embedding, contrastive loss (beta 0.5) in-batch and against a cross-batch
memory, plus the KoLeo regulariser (weight 0.7).
"""

from __future__ import annotations

import ml_collections

from jaxdml import config as config_lib
from jaxdml import teacher
from jaxdml.config import datasets
from jaxdml.recipes import backbones
from jaxdml.recipes.common import on_embedded_data, single_task, use_xbm_loss

# data set -> (iterations, memory size as a fraction of the train set).
HPARAMS = {"sop": (35_000, 1.0), "cub": (2_000, 1.0), "inshop": (35_000, 0.2)}


def irt(dataset: str, arg) -> ml_collections.ConfigDict:
  """AdamW lr 3e-5, wd 5e-4, batch 64; resize 256, random 224 crop, flip.

  In-Shop's memory is 0.2 of the data set, filled by a momentum encoder
  (0.999). Arguments: `smoke`, `demo`, `koleo=W` (0: no KoLeo, for the
  ablation), `seed=N`, `backbone=NAME` (DeiT-S's place taken by e.g.
  dinov2_vit_s14, clip_vit_b16, convnext_tiny: `recipes.backbones`).
  """
  arg = config_lib.parse_arg(arg, smoke=False, demo=False, koleo=0.7, seed=0, backbone="")
  if dataset not in HPARAMS:
    raise ValueError(f"IRT has settings for {sorted(HPARAMS)}, not {dataset!r}.")
  steps, memory_fraction = HPARAMS[dataset]
  c = single_task(dataset, seed=arg.seed)
  c.total_steps = steps
  c.model = ml_collections.ConfigDict(dict(
      name="vit_s16", pooling="cls", embed_dim=None, head_norm="l2", init_file=None,
      dtype="auto"))
  # The paper's sum over pairs and mean over the batch (XBM's reduction),
  # in-batch and against the memory; KoLeo on the batch alone, outside the
  # ranking loss so the memory term does not count it twice.
  c.loss = ml_collections.ConfigDict(dict(
      name="contrastive", distance="cosine", pos_margin=1.0, neg_margin=0.5))
  use_xbm_loss(c)
  if arg.koleo:
    c.terms.koleo = dict(weight=arg.koleo)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-5, weight_decay=5e-4, schedule="constant", warmup_steps=0, grad_clip_norm=None))
  # Resize to 256 x 256, then a random 224 crop. (A random resized crop of
  # area (224/256)^2 and aspect 1 is not that: on a 500 x 375 image it asks
  # for a 379 px square, never fits, and falls back to the centre crop.)
  c.data.augment.resize_square = 256
  c.memory.size = int(memory_fraction * datasets.CATALOGUE[dataset].train_images)
  c.memory.start_step = 0
  if memory_fraction < 1.0:
    c.teacher = teacher.teacher_config("momentum", momentum=0.999, feeds_memory=True)
  if arg.smoke or arg.demo:
    # A ViT of the size, a free aspect ratio, the memory used from the start.
    on_embedded_data(c, smoke=arg.smoke, recipe={
        "model.name": "vit_tiny" if arg.smoke else "vit_small_demo", "model.embed_dim": None,
        "data.augment.resize_square": None, "data.augment.ratio": (3 / 4, 4 / 3),
        "memory.start_step": 0})
  backbones.apply(c, arg.backbone, smoke=arg.smoke, demo=arg.demo)
  return c
