"""XBM / XBN recipes (PAPERS.md section 2): `configs/{sop,inshop,deepfashion2}_xbn.py`."""

from __future__ import annotations

import ml_collections

from jaxdml import config as config_lib
from jaxdml.recipes import backbones
from jaxdml.recipes.common import on_embedded_data, single_task, use_xbm_loss


def xbn(dataset: str, arg, *, memory_size: int) -> ml_collections.ConfigDict:
  """XBM/XBN recipe: XBM's contrastive loss against an adapted cross-batch memory.

  Arguments: `adapt=none|moments|kalman` (none is XBM), `smoke`, `demo`,
  `seed=N`, `backbone=NAME` (ResNet-50's place taken by e.g.
  dinov2_vit_s14, clip_vit_b16, convnext_tiny, the 128-d head kept:
  `recipes.backbones`). XBM's published SOP settings (PAPERS.md section 2).
  """
  arg = config_lib.parse_arg(arg, smoke=False, demo=False, adapt="moments", seed=0,
                             backbone="")
  if arg.adapt not in ("none", "moments", "kalman"):
    raise ValueError(f"adapt={arg.adapt!r}: expected 'none' (XBM), 'moments' "
                     "(XBN) or 'kalman' (XBN with Kalman-filtered moments).")
  c = single_task(dataset, seed=arg.seed)
  use_xbm_loss(c)
  c.memory.size = memory_size
  c.memory.start_step = 1_000
  c.memory.adapt = arg.adapt
  if arg.adapt == "kalman":
    # Spelt out, so --config.memory.adapt_hparams.X= can override them.
    # process_noise 0.1: the variance of the per-batch BatchNorm shift
    # measured in training (0.29-0.33 std per dimension,
    # tests/measure_bn_shift.py), which is real for the batch's anchors, so
    # the filter must follow it (docs/ablations.md, section 2).
    c.memory.adapt_hparams = dict(process_noise=0.1, measurement_noise=1.0, adaptive=True)
  if arg.smoke or arg.demo:
    on_embedded_data(c, smoke=arg.smoke)
  backbones.apply(c, arg.backbone, smoke=arg.smoke, demo=arg.demo)
  return c
