"""IRT on CUB-200-2011: DeiT-S CLS embedding, contrastive loss + KoLeo, cross-batch memory.

El-Nouby et al. 2021 (PAPERS.md section 5). Published DeiT-S IRT_R: R@1 74.7 (PCA 128-d: 72.6).

    python -m jaxdml.main --config=configs/cub_irt.py \\
        --config.model.init_file=deit_small_imagenet.safetensors --workdir=workdirs/cub_irt

Arguments: `smoke`, `demo`, `koleo=W` (0 turns KoLeo off), `seed=N`, `backbone=NAME`
(e.g. dinov2_vit_s14, clip_vit_b16, convnext_tiny; jaxdml.recipes.backbones).
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.irt("cub", arg)
