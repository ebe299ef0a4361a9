"""RAML student on Stanford Online Products: 224 px queries against a 448 px teacher's database.

Suma & Tolias, WACV 2023 (PAPERS.md section 3). Published: asym R@1 81.14 (mAP 60.23), sym R@1 81.44.

    python -m jaxdml.main --config=configs/sop_raml.py \\
        --config.model.init_file=resnet50_imagenet.safetensors \\
        --config.teacher.workdir=workdirs/sop_raml_teacher --workdir=workdirs/sop_raml

Evaluation reports the symmetric metrics and, under `asym/`, the student's
queries against the teacher's database. Arguments: `smoke`, `demo`, `seed=N`.
"""

from jaxdml import recipes


def get_config(arg=None):
  return recipes.raml("sop", arg)
