"""RAML teacher on Stanford Online Products: ResNet-50 GeM 512-d at 448 px, triplet loss.

Suma & Tolias, WACV 2023 (PAPERS.md section 3). Train it before
`configs/sop_raml.py`, whose student distils it:

    python -m jaxdml.main --config=configs/sop_raml_teacher.py \\
        --config.model.init_file=resnet50_imagenet.safetensors --workdir=workdirs/sop_raml_teacher

Arguments: `smoke`, `demo` (embedded data), `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.raml_teacher("sop", arg)
