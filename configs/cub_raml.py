"""RAML student on CUB-200-2011: 224 px queries against a 448 px teacher's database.

Suma & Tolias, WACV 2023 (PAPERS.md section 3). Published: asym R@1 70.43 (mAP 40.80), sym R@1 71.79.

    python -m jaxdml.main --config=configs/cub_raml.py \\
        --config.model.init_file=resnet50_imagenet.safetensors \\
        --config.teacher.workdir=workdirs/cub_raml_teacher --workdir=workdirs/cub_raml

Evaluation reports the symmetric metrics and, under `asym/`, the student's
queries against the teacher's database. Arguments: `smoke`, `demo`, `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.raml("cub", arg)
