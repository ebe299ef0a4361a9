r"""Forward FLOPs per image of registered encoders, from XLA's cost analysis.

    python benchmarks/model_flops.py --models=dinov2_vit_s14,clip_vit_b16,convnext_tiny

Prints one JSON line per model: GFLOPs per image at `--image_size` (224)
from the lowered (not compiled) forward pass of a batch of one, float32,
the default head (ViTs: the CLS token, CLIP through its projection; CNNs:
average pooling), and the parameter count. Shapes only: no weights are made,
so ViT-L takes seconds.
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from jaxdml import models

_MODELS = flags.DEFINE_list("models", [
    "resnet50", "vit_s16", "dinov2_vit_s14", "dinov2_vit_b14", "dinov2_vit_l14",
    "clip_vit_b16", "clip_vit_b32", "clip_vit_l14", "convnext_tiny", "convnext_small",
    "convnext_base"], "Registered model names.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")


def forward_flops(name: str, size: int) -> dict:
  model = models.get(name, dtype="float32")
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))
  cost = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, images).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {"model": name, "image_size": size, "gflops_per_image": round(cost["flops"] / 1e9, 2),
          "params_m": round(params / 1e6, 2)}


def main(argv):
  del argv
  for name in _MODELS.value:
    print(json.dumps(forward_flops(name, _IMAGE_SIZE.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
