"""Encoders: an explicit registry `get(name, **kwargs)`, `register`, `names`.

Every encoder takes NHWC float images and returns `(output, intermediates)`
from `module.apply(variables, images, train=...)`. Common kwargs:
`num_classes` (classifier logits in the torchvision/timm layout), `embed_dim`,
`pooling`, `head_norm`, `dtype`, `frozen_bn`, `remat`, `image_size`.

`dtype` is the compute dtype of the backbone's activations: "float32",
"bfloat16", "float16" or "auto" (bfloat16 on GPU and TPU, float32 on CPU,
`compute_dtype`). Parameters, BatchNorm statistics and normalisation and
the embedding head stay float32 whatever it is.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models import convnext, resnet, shufflenet, vit
from jaxdml.models.heads import EmbeddingHead
from jaxdml.models.layers import BatchNorm
from jaxdml.models.torch_import import load_torch_weights
from jaxdml.models.two_tower import TwoTower

__all__ = ["get", "register", "names", "architecture", "compute_dtype", "with_dtype", "dtype_of", "TwoTower",
           "BatchNorm", "EmbeddingHead", "load_torch_weights"]


# float64 is for exact cross-checks (tests), with jax.enable_x64.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype(dtype: str, platform: str | None = None) -> str:
  """A model's `dtype` with "auto" resolved for `platform` (default: JAX's default backend).

  "auto" is bfloat16 on GPU and TPU (tensor cores and the MXU run it at full
  rate; float32 runs at a fraction) and float32 on CPU, which has no fast
  bf16 matmul.
  """
  if isinstance(dtype, str) and dtype == "auto":
    platform = platform or jax.default_backend()
    return "bfloat16" if platform in _ACCELERATORS else "float32"
  try:
    name = str(jnp.dtype(dtype))
  except TypeError:
    name = None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model dtype {dtype!r} is not supported; use one of {COMPUTE_DTYPES}.")
  return name


def with_dtype(spec: dict, dtype: str) -> dict:
  """A model spec (`name` + kwargs, two-tower towers included) with every `dtype` set."""
  if spec.get("name") != "two_tower":
    return {**spec, "dtype": dtype}
  return {**spec, **{side: {**spec[side], "dtype": dtype} for side in ("query", "gallery")}}


def dtype_of(model: nn.Module) -> str:
  """The compute dtype of a built encoder (a two-tower model's gallery tower's)."""
  model = model.gallery if isinstance(model, TwoTower) else model
  return str(jnp.dtype(model.dtype))


def _two_tower(*, query: dict, gallery: dict, platform: str | None = None) -> TwoTower:
  """`get("two_tower", query=dict(name=..., **kw), gallery=dict(name=..., **kw))`."""
  towers = {}
  for side, spec in (("query", query), ("gallery", gallery)):
    if not isinstance(spec, dict) or "name" not in spec:
      raise ValueError(f"two_tower: {side} must be a dict with a 'name' key and model kwargs, "
                       f"got {spec!r}.")
    spec = dict(spec)
    towers[side] = get(spec.pop("name"), platform=platform, **spec)
  return TwoTower(**towers)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{n: functools.partial(resnet.make, n) for n in resnet.VARIANTS},
    **{n: functools.partial(vit.make, n) for n in vit.VARIANTS},
    **{n: functools.partial(shufflenet.make, n) for n in shufflenet.VARIANTS},
    **{n: functools.partial(convnext.make, n) for n in convnext.VARIANTS},
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


_ARCHITECTURES = {"resnet": resnet.VARIANTS, "vit": vit.VARIANTS,
                  "shufflenet": shufflenet.VARIANTS, "convnext": convnext.VARIANTS}


def architecture(name: str) -> str:
  """What registered model `name` is: "vit" (DINOv2 and CLIP towers
  included: a CLS token), "resnet", "shufflenet", "convnext", "two_tower",
  or "custom" (added with `register`)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; registered models: {', '.join(names())}.")
  for kind, variants in _ARCHITECTURES.items():
    if name in variants:
      return kind
  return "two_tower" if name == "two_tower" else "custom"


def get(name: str, *, platform: str | None = None, **kwargs: Any) -> nn.Module:
  """The module registered as `name`, built with `kwargs` (e.g. embed_dim=512, pooling="gem").

  `dtype="auto"` is resolved for `platform` (default: JAX's default backend).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; registered models: {', '.join(names())}.")
  if name == "two_tower":
    kwargs["platform"] = platform
  elif "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"], platform)
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise TypeError(f"model {name!r} rejected its kwargs {sorted(kwargs)}: {e}") from e
