"""SBIR knowledge distillation: ShuffleNetV2 towers learn from a trained teacher.

Seddati et al. 2023 (arXiv 2305.18988), PAPERS.md section 1: the small
student keeps the teacher's recipe (two towers, BatchNorm embeddings, RTL)
and also regresses the frozen teacher's embeddings of the same sketches and
photos; the paper reports a "marginal loss of accuracy".

    # 1. The teacher (configs/sketchy_rtl.py), then 2. the student:
    python -m jaxdml.main --config=configs/sketchy_rtl.py --workdir=workdirs/sketchy
    python -m jaxdml.main --config=configs/sketchy_rtl_kd.py \\
        --config.teacher.workdir=workdirs/sketchy --workdir=workdirs/sketchy_kd
    # Embedded data: the same two commands with :demo (or :smoke) on both.

Arguments: `smoke`, `demo`, `distill=mse|cosine|relational|off` (off: the
student alone, for the ablation), `distill_weight`, `seed=N`. The teacher is
the one `configs/sketchy_rtl.py` trains with the same `smoke`/`demo` choice:
the student's embedding width follows it.

Our choices where the paper is silent: ShuffleNetV2 1.0x for both towers
(`demo`: a half-width ResNet pair, see below), MSE on the BatchNorm
embeddings (unit variance per dimension, so the term is O(1)) with weight 1,
added to the RTL.
"""

import importlib.util
import os

from jaxdml import config as config_lib
from jaxdml import teacher

_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sketchy_rtl.py")


def _teacher_recipe():
  spec = importlib.util.spec_from_file_location("jaxdml_config_sketchy_rtl", _TEACHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, demo=False, distill="mse",
                             distill_weight=1.0, seed=0)
  if arg.distill not in ("mse", "cosine", "relational", "off"):
    raise ValueError(f"distill={arg.distill!r}: expected mse, cosine, relational or off.")
  size = "smoke" if arg.smoke else "demo" if arg.demo else ""
  c = _teacher_recipe().get_config(f"{size},seed={arg.seed}" if size else f"seed={arg.seed}")
  student = {"smoke": dict(name="shufflenet_v2_tiny"),
             # ShuffleNetV2 0.5x did not learn from scratch at 64 px in the
             # demo's minutes (R@1 at chance, with or without distillation;
             # its gradients match torch's): the demo student is a ResNet
             # pair at half the teacher's width, a quarter of its FLOPs.
             "demo": dict(name="resnet_small", widths=(16, 32, 64, 128), stem_width=16)
             }.get(size, dict(name="shufflenet_v2_x1_0"))
  for side in ("query", "gallery"):
    tower = dict(c.model[side])
    tower.update(pooling="avg", **student)
    c.model[side] = tower
  if arg.distill != "off":
    c.teacher = teacher.teacher_config(
        "frozen", recipe=f"sketchy_rtl{':' + size if size else ''}")
    c.terms.embedding_distill = dict(weight=arg.distill_weight, mode=arg.distill)
  return c
