"""Encoders: an explicit registry `get(name, **kwargs)`, `register`, `names`.

Every encoder takes NHWC float images and returns `(output, intermediates)`
from `module.apply(variables, images, train=...)`. Common kwargs:
`num_classes` (classifier logits in the torchvision/timm layout), `embed_dim`,
`pooling`, `head_norm`, `dtype`, `frozen_bn`, `remat`, `image_size`.
"""
import functools
from typing import Callable

import flax.linen as nn

from jaxdml.models import resnet, shufflenet, vit
from jaxdml.models.heads import EmbeddingHead
from jaxdml.models.layers import BatchNorm
from jaxdml.models.torch_import import load_torch_weights
from jaxdml.models.two_tower import TwoTower

__all__ = ["get", "register", "names", "TwoTower", "BatchNorm", "EmbeddingHead",
           "load_torch_weights"]


def _two_tower(*, query: dict, gallery: dict) -> TwoTower:
  """`get("two_tower", query=dict(name=..., **kw), gallery=dict(name=..., **kw))`."""
  towers = {}
  for side, spec in (("query", query), ("gallery", gallery)):
    if not isinstance(spec, dict) or "name" not in spec:
      raise ValueError(f"two_tower: {side} must be a dict with a 'name' key and model kwargs, "
                       f"got {spec!r}.")
    spec = dict(spec)
    towers[side] = get(spec.pop("name"), **spec)
  return TwoTower(**towers)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{n: functools.partial(resnet.make, n) for n in resnet.VARIANTS},
    **{n: functools.partial(vit.make, n) for n in vit.VARIANTS},
    **{n: functools.partial(shufflenet.make, n) for n in shufflenet.VARIANTS},
    "two_tower": _two_tower,
}


def register(name: str, constructor: Callable[..., nn.Module]) -> None:
  """Adds `constructor(**kwargs) -> nn.Module` under `name`; an existing name is an error."""
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is already registered; pick another name.")
  _REGISTRY[name] = constructor


def names() -> list[str]:
  """Registered model names, sorted."""
  return sorted(_REGISTRY)


def get(name: str, **kwargs) -> nn.Module:
  """The module registered as `name`, built with `kwargs` (e.g. embed_dim=512, pooling="gem")."""
  if name not in _REGISTRY:
    raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}.")
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise TypeError(f"model {name!r} rejected its kwargs {sorted(kwargs)}: {e}") from e
