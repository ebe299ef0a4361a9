"""Proxy-Anchor recipes: `configs/{cub,cars,sop}_proxy_anchor.py`.

Kim et al., CVPR 2020, the usual strong baseline of PML users, with the
settings of the authors' README (tjddus9597/Proxy-Anchor-CVPR2020) for
ResNet-50, 512-d: AdamW lr 1e-4, weight decay 1e-4, proxies at 100x the
learning rate, alpha 32, margin 0.1, 60 epochs (their `train.py`
default), frozen BatchNorm; CUB batch 120, lr halved every 5 epochs
(published R@1 69.9); Cars batch 120, halved every 10 (87.7); both warm
up 5 epochs (`--warm 5`: only the embedding layer and the proxies train,
`optimizer.warm_steps` here). Their README gives SOP only for
Inception-BN: batch 180, lr 6e-4, x0.25 every 20 epochs, BatchNorm
trained, `--warm 1` (79.2); we use those with ResNet-50. Their ResNet-50
pools avg + max, `pooling="avgmax"` here.

Ours, where jaxdml differs: batches are m-per-class (4 images of each
class; the authors sample at random).
"""

from __future__ import annotations

import ml_collections

from jaxdml import config as config_lib
from jaxdml.config import datasets
from jaxdml.recipes.common import on_embedded_data, single_task

# data set -> (batch, lr, epochs between decays, decay rate, frozen BN, warm-up epochs).
HPARAMS = {"cub": (120, 1e-4, 5, 0.5, True, 5), "cars196": (120, 1e-4, 10, 0.5, True, 5),
           "sop": (180, 6e-4, 20, 0.25, False, 1)}
EPOCHS = 60


def proxy_anchor(dataset: str, arg) -> ml_collections.ConfigDict:
  """Arguments: `smoke`, `demo`, `seed=N`."""
  arg = config_lib.parse_arg(arg, smoke=False, demo=False, seed=0)
  if dataset not in HPARAMS:
    raise ValueError(f"Proxy-Anchor has settings for {sorted(HPARAMS)}, not {dataset!r}.")
  batch, lr, decay_epochs, decay_rate, frozen_bn, warm_epochs = HPARAMS[dataset]
  c = single_task(dataset, seed=arg.seed)
  c.model = ml_collections.ConfigDict(dict(
      name="resnet50", pooling="avgmax", embed_dim=512, head_norm="l2", frozen_bn=frozen_bn,
      init_file=None, dtype="auto"))
  c.loss = ml_collections.ConfigDict(dict(name="proxy_anchor", margin=0.1, alpha=32.0))
  c.batch_size = batch
  c.epoch_steps = datasets.CATALOGUE[dataset].train_images // c.batch_size
  c.total_steps = EPOCHS * c.epoch_steps
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=lr, weight_decay=1e-4, schedule="step",
      decay_steps=decay_epochs * c.epoch_steps, decay_rate=decay_rate, warmup_steps=0,
      grad_clip_norm=None, lr_multipliers={"loss_params": 100.0},
      warm_steps=warm_epochs * c.epoch_steps))
  c.memory.size = 0
  if arg.smoke or arg.demo:
    # From scratch BN learns its statistics; 300 demo steps are 6 "epochs"
    # of 50, the learning rate halved every 2, the first one a warm-up.
    on_embedded_data(c, smoke=arg.smoke, recipe={
        "model.frozen_bn": False, "epoch_steps": 1 if arg.smoke else 50,
        "optimizer.decay_steps": 1 if arg.smoke else 100,
        "optimizer.warm_steps": 1 if arg.smoke else 50})
  return c
