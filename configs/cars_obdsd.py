"""OBD-SD on Cars196: Multi-Similarity + online batch diffusion self-distillation.

Zeng et al. 2022 (PAPERS.md section 4; code ZelongZeng/OBD-SD_Pytorch). The
teacher is the previous epoch's weights, kept in the train state.

    python -m jaxdml.main --config=configs/cars_obdsd.py \\
        --config.model.init_file=resnet50_imagenet.safetensors --workdir=workdirs/cars_obdsd

Arguments: `smoke`, `demo`, `distill=False` (MS alone), `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.obdsd("cars196", arg)
