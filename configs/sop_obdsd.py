"""OBD-SD on Stanford Online Products: Multi-Similarity + online batch diffusion self-distillation.

Zeng et al. 2022 (PAPERS.md section 4; code ZelongZeng/OBD-SD_Pytorch). The
teacher is the previous epoch's weights, kept in the train state.

    python -m jaxdml.main --config=configs/sop_obdsd.py \\
        --config.model.init_file=resnet50_imagenet.safetensors --workdir=workdirs/sop_obdsd

Arguments: `smoke`, `demo`, `distill=False` (MS alone), `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.obdsd("sop", arg)
