"""RAML student on Cars196: 224 px queries against a 448 px teacher's database.

Suma & Tolias, WACV 2023 (PAPERS.md section 3). Published: asym R@1 85.06 (mAP 39.43), sym R@1 86.87.

    python -m jaxdml.main --config=configs/cars_raml.py \\
        --config.model.init_file=resnet50_imagenet.safetensors \\
        --config.teacher.workdir=workdirs/cars_raml_teacher --workdir=workdirs/cars_raml

Evaluation reports the symmetric metrics and, under `asym/`, the student's
queries against the teacher's database. Arguments: `smoke`, `demo`, `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.raml("cars196", arg)
