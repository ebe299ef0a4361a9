"""`backbone=NAME`: a recipe's encoder swapped, the paper's other settings kept.

    python -m jaxdml.main --config=configs/sop_irt.py:backbone=dinov2_vit_s14 ...
    python -m jaxdml.main --config=configs/sop_xbn.py:backbone=clip_vit_b16 ...

Each family brings what its pretrained weights expect: the pooling (ViTs,
DINOv2 and CLIP included: the CLS token; CNNs: average pooling), the image
statistics (CLIP's own mean/std, ImageNet's for the rest) and a patch size
the recipe's image size must be a multiple of. The recipe keeps its head
(`embed_dim`: IRT's raw CLS token, XBM's linear 128-d). Under `:smoke` the
family's test-sized model stands in, so a smoke run checks the wiring in
seconds.
"""

from __future__ import annotations

import dataclasses

import ml_collections

# CLIP's image statistics (OpenAI's preprocessing; open_clip's and timm's
# OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Family:
  """What the encoders of one family need from a recipe."""
  names: tuple
  pooling: str
  smoke_model: str
  image_stats: tuple | None = None  # (mean, std); None: ImageNet's, the models' default


def _vit_names(prefix: str, sizes: tuple, suffixes: tuple = ("",)) -> tuple:
  return tuple(f"{prefix}{s}{x}" for s in sizes for x in suffixes)


FAMILIES = {
    "resnet": Family(("resnet50",), "avg", "resnet_tiny"),
    "vit": Family(("vit_s16", "vit_b16"), "cls", "vit_tiny"),
    "dinov2": Family(_vit_names("dinov2_vit_", ("s14", "b14", "l14"), ("", "_reg4")), "cls",
                     "dinov2_vit_tiny"),
    "clip": Family(_vit_names("clip_vit_", ("b16", "b32", "l14"), ("", "_quickgelu")), "cls",
                   "clip_vit_tiny", (CLIP_MEAN, CLIP_STD)),
    "convnext": Family(("convnext_tiny", "convnext_small", "convnext_base"), "avg",
                       "convnext_test"),
}


def known() -> list[str]:
  """Every backbone a recipe accepts, sorted."""
  return sorted(n for f in FAMILIES.values() for n in f.names)


def family_of(name: str) -> Family:
  """The family of backbone `name`; an unknown name is one ValueError listing the known ones."""
  for family in FAMILIES.values():
    if name in family.names:
      return family
  raise ValueError(f"backbone={name!r} is unknown; known backbones: {', '.join(known())}.")


def patch_size(name: str) -> int | None:
  """A ViT's patch size (from the model registry's variants), None for a CNN."""
  from jaxdml.models import vit  # pylint: disable=g-import-not-at-top
  if name not in vit.VARIANTS:
    return None
  return int(vit.VARIANTS[name].get("patch_size", vit.ViT.patch_size))


def apply(c: ml_collections.ConfigDict, name: str | None, *, smoke: bool = False,
          demo: bool = False) -> None:
  """Sets `c.model` to backbone `name` (None: the recipe's own, untouched).

  Call after the recipe's `:smoke`/`:demo` overlay: under `smoke` the
  family's test-sized model replaces the real one at the smoke image size;
  under `demo` the real one runs at the largest multiple of its patch not
  above the demo's size. Otherwise an image size that is not a multiple of
  the patch is an error (a ViT would drop the remainder).
  """
  if not name:
    return
  family = family_of(name)
  model = family.smoke_model if smoke else name
  c.model.name = model
  c.model.pooling = family.pooling
  if family.image_stats is not None:
    c.model.image_mean, c.model.image_std = (tuple(s) for s in family.image_stats)
  patch = patch_size(model)
  if patch and demo:
    c.data.image_size = int(c.data.image_size) // patch * patch
  if patch and int(c.data.image_size) % patch:
    raise ValueError(f"backbone={name!r}: data.image_size={c.data.image_size} is not a "
                     f"multiple of its {patch}-px patch; use e.g. "
                     f"{int(c.data.image_size) // patch * patch}.")
