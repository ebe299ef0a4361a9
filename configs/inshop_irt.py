"""IRT on In-Shop: DeiT-S CLS embedding, contrastive loss + KoLeo, cross-batch memory.

El-Nouby et al. 2021 (PAPERS.md section 5). Published DeiT-S IRT_R: R@1 91.5 (PCA 128-d: 91.1); memory 0.2 of the data set, filled by a 0.999 momentum encoder.

    python -m jaxdml.main --config=configs/inshop_irt.py \\
        --config.model.init_file=deit_small_imagenet.safetensors --workdir=workdirs/inshop_irt

Arguments: `smoke`, `demo`, `koleo=W` (0 turns KoLeo off), `seed=N`, `backbone=NAME`
(e.g. dinov2_vit_s14, clip_vit_b16, convnext_tiny; jaxdml.recipes.backbones).
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.irt("inshop", arg)
