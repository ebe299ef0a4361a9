"""The train step of the PyTorch CPU anchor, for `jaxdml.bench`.

    python -m jaxdml.bench --config=configs/encoder_bench.py:model=resnet50
    python -m jaxdml.bench --config=configs/encoder_bench.py:model=vit_s16
    python -m jaxdml.bench --config=configs/encoder_bench.py:model=shufflenet_v2_x1_0
    python -m jaxdml.bench --config=configs/encoder_bench.py:model=dinov2_vit_s14

Same step as shared/anchors/torch_train_step.py: 224 px, batch 16, AdamW
(lr 1e-4), batch-all triplet loss (margin 0.2) on L2-normalised embeddings;
CNNs (ResNet, ShuffleNet, ConvNeXt) average-pooled with a linear 512-d
projection; ViTs (DINOv2 and CLIP too: what the model registry says, not the
name) with their CLS token (CLIP's through its own projection), no extra
projection. Trainable on the embedded data too (`python -m jaxdml.main`), but it
exists to time the step; `smoke` shrinks it for tests.
"""

import ml_collections

from jaxdml import config as config_lib
from jaxdml import models
from jaxdml import recipes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, model="resnet50", batch_size=16, smoke=False,
                             dtype="auto", seed=0)
  c = recipes.single_task("sop", seed=arg.seed)
  c.batch_size = arg.batch_size
  c.total_steps = 100
  vit = models.architecture(arg.model) == "vit"
  c.model = ml_collections.ConfigDict(dict(
      name=arg.model, pooling="cls" if vit else "avg", head_norm="l2",
      embed_dim=None if vit else 512, dtype=arg.dtype))
  c.loss = ml_collections.ConfigDict(dict(name="triplet", margin=0.2,
                                          distance="euclidean", mining="all"))
  c.optimizer = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, weight_decay=0.01))
  c.data.name = "synthetic_sketchy"
  c.data.single_labels = "instance"
  if arg.smoke:
    # The family's test-sized model (recipes.backbones) where it has one.
    known = arg.model in recipes.backbones.known()
    tiny = (recipes.backbones.family_of(arg.model).smoke_model if known
            else "vit_tiny" if vit else "resnet_tiny")
    recipes.on_embedded_data(c, smoke=True, recipe={
        "model.name": tiny,
        "model.embed_dim": None if vit else 16})
  return c
