"""IRT on Stanford Online Products: DeiT-S CLS embedding, contrastive loss + KoLeo, cross-batch memory.

El-Nouby et al. 2021 (PAPERS.md section 5). Published DeiT-S IRT_R: R@1 84.0 (PCA 128-d: 83.4).

    python -m jaxdml.main --config=configs/sop_irt.py \\
        --config.model.init_file=deit_small_imagenet.safetensors --workdir=workdirs/sop_irt

Arguments: `smoke`, `demo`, `koleo=W` (0 turns KoLeo off), `seed=N`, `backbone=NAME`
(e.g. dinov2_vit_s14, clip_vit_b16, convnext_tiny; jaxdml.recipes.backbones).
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.irt("sop", arg)
