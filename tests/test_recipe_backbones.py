"""`backbone=NAME` in the IRT and XBN recipes: the encoder swapped, the rest kept."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import build, checkpoint, data, metrics_writer, models, train
from jaxdml import config as config_lib
from jaxdml.recipes import backbones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("sop_irt.py", "cub_irt.py", "inshop_irt.py", "sop_xbn.py", "inshop_xbn.py",
           "deepfashion2_xbn.py")
# The smallest model of each new family.
SMALLEST = ("dinov2_vit_s14", "clip_vit_b16", "convnext_tiny")


def load(recipe, arg=""):
  return config_lib.load_config(os.path.join(ROOT, "configs", recipe), arg)


def without_model(config):
  d = config_lib.as_dict(config_lib.resolve(config))
  d.pop("model")
  return d


@pytest.mark.parametrize("recipe", RECIPES)
def test_default_is_the_recipe_as_it_was(recipe):
  """No backbone (or an empty one) leaves the config alone: no new field."""
  default = config_lib.as_dict(config_lib.resolve(load(recipe)))
  assert default == config_lib.as_dict(config_lib.resolve(load(recipe, "backbone=")))
  assert "image_mean" not in default["model"] and "image_std" not in default["model"]
  assert default["model"]["name"] == ("vit_s16" if "irt" in recipe else "resnet50")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", SMALLEST)
def test_backbone_changes_the_encoder_only(recipe, name):
  """Full size: the named encoder with its family's pooling and statistics,
  every other field the paper's; it resolves and its parameters trace."""
  config = load(recipe, f"backbone={name}")
  assert without_model(config) == without_model(load(recipe))
  model = config_lib.as_dict(config.model)
  default = config_lib.as_dict(load(recipe).model)
  assert model["name"] == name
  assert model["pooling"] == ("avg" if name.startswith("convnext") else "cls")
  assert model["embed_dim"] == default["embed_dim"]  # IRT: the raw token; XBN: 128-d
  if name.startswith("clip"):
    assert tuple(model["image_mean"]) == backbones.CLIP_MEAN
    assert tuple(model["image_std"]) == backbones.CLIP_STD
  else:
    assert "image_mean" not in model
  if recipe.startswith("sop"):  # tracing the full model: once per recipe kind is enough
    abstract = build.build(config_lib.resolve(config)).abstract["params"]
    assert jax.tree.leaves(abstract)


def test_unknown_backbone_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"backbone='dino'.*clip_vit_b16.*convnext_tiny.*"
                                       r"dinov2_vit_s14"):
    load("sop_irt.py", "backbone=dino")


def test_image_size_must_be_a_multiple_of_the_patch():
  config = load("sop_xbn.py")
  config.data.image_size = 225
  with pytest.raises(ValueError, match="225 is not a multiple of its 14-px patch.*224"):
    backbones.apply(config, "dinov2_vit_s14")
  demo = load("sop_irt.py", "demo,backbone=dinov2_vit_s14")  # 64 px -> 56
  assert demo.model.name == "dinov2_vit_s14" and demo.data.image_size == 56


def test_clip_statistics_equal_normalising_with_them():
  """A CLIP encoder fed the pipeline's ImageNet-normalised images sees
  exactly the pixels normalised with CLIP's own mean and std."""
  images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  clip = models.get("clip_vit_tiny", image_mean=backbones.CLIP_MEAN,
                    image_std=backbones.CLIP_STD)
  plain = models.get("clip_vit_tiny")
  variables = clip.init(jax.random.key(0), data.normalize(images))
  by_hand = (images / 255.0 - np.array(backbones.CLIP_MEAN)) / np.array(backbones.CLIP_STD)
  got = clip.apply(variables, data.normalize(images))[0]
  want = plain.apply(variables, jnp.asarray(by_hand, jnp.float32))[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  x = data.normalize(images)
  renormalised = models.layers.to_image_stats(x, backbones.CLIP_MEAN, backbones.CLIP_STD)
  np.testing.assert_allclose(renormalised, by_hand, atol=1e-5)
  assert np.abs(renormalised - x).max() > 0.1
  # ImageNet's statistics (the default) are the identity, bit for bit.
  assert models.layers.to_image_stats(x, data.MEAN, data.STD) is x
  with pytest.raises(ValueError, match="3 per-channel values"):
    models.layers.to_image_stats(x, (0.5, 0.5), data.STD)


# The fast suite runs DINOv2 on IRT and CLIP (its own image statistics) on
# XBN; every other pair, and ConvNeXt (its test model compiles slowest,
# ~20 s), in the slow one: each family's train step is also test_backbones'.
FAST_SMOKE = {("cub_irt.py", "dinov2"), ("sop_xbn.py", "clip")}
SMOKE_PAIRS = [
    pytest.param(recipe, name, marks=() if (recipe, name.split("_")[0]) in FAST_SMOKE
                 else pytest.mark.slow)
    for recipe in ("cub_irt.py", "sop_xbn.py") for name in SMALLEST]


@pytest.mark.parametrize("recipe,name", SMOKE_PAIRS)
def test_smoke_trains_one_step(recipe, name, tmp_path):
  """`:smoke` runs the family's test-sized model (same pooling and
  statistics) for one step on the embedded data."""
  config = load(recipe, f"smoke,backbone={name}")
  assert config.model.name == backbones.family_of(name).smoke_model
  config.total_steps = 1
  for evaluator in config.evals:
    config.evals[evaluator].enabled = False
  train.train_and_evaluate(config, str(tmp_path))
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert rows[0]["step"] == 1 and np.isfinite(rows[0]["loss"])
  assert checkpoint.Checkpointer(str(tmp_path)).latest_step() == 1
