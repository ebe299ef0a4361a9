"""State dicts in other repositories' layouts, renamed to timm's (what the encoders mirror).

Transcribed from timm's `vision_transformer.checkpoint_filter_fn`, so a
checkpoint loads here exactly as `timm.create_model(..., pretrained=True)`
would load it:
- open_clip / OpenAI CLIP (`visual.*`, `_convert_openai_clip`): the image
  tower is renamed (`conv1` -> `patch_embed.proj`, `ln_pre` -> `norm_pre`,
  `transformer.resblocks.N` -> `blocks.N`, `in_proj_` -> `qkv.`, ...), the
  projection `visual.proj` `[D, E]` becomes `head.weight` `[E, D]` with a
  zero `head.bias`; the text tower and `logit_scale` are dropped.
- facebookresearch/dinov2 (`mask_token`, `_convert_dinov2`): `mask_token`
  is dropped; with registers, `register_tokens` becomes `reg_token`, the
  CLS position is folded into `cls_token` and `pos_embed` keeps the patches.
"""
import numpy as np

_CLIP_SWAPS = (
    ("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
    ("transformer.resblocks.", "blocks."), ("ln_pre", "norm_pre"), ("ln_post", "norm"),
    ("ln_", "norm"), ("in_proj_", "qkv."), ("out_proj", "proj"), ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"))


def to_timm(src: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
  """`(state dict in timm's keys, layout name, source keys dropped on purpose)`.

  The layout is "open_clip", "dinov2" or "timm" (anything else: returned as is).
  """
  for prefix in ("visual.", "module.visual."):
    if prefix + "class_embedding" in src:
      return _from_open_clip(src, prefix)
  if "mask_token" in src:
    return _from_dinov2(src)
  return src, "timm", []


def _from_open_clip(src, prefix):
  out, dropped = {}, []
  for key, value in src.items():
    if not key.startswith(prefix):
      dropped.append(key)  # the text tower, logit_scale
      continue
    key = key[len(prefix):]
    for old, new in _CLIP_SWAPS:
      key = key.replace(old, new)
    if key == "proj":
      key, value = "head.weight", value.T
      out["head.bias"] = np.zeros(value.shape[0], value.dtype)
    elif key == "class_embedding":
      key, value = "cls_token", value[None, None]
    elif key == "pos_embed":
      value = value[None]
    out[key] = value
  return out, "open_clip", dropped


def _from_dinov2(src):
  out = {k: v for k, v in src.items() if k != "mask_token"}
  if "register_tokens" in out:
    # timm's reg4 models add no position to CLS or registers: fold CLS's into the token.
    out["reg_token"] = out.pop("register_tokens")
    out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
    out["pos_embed"] = out["pos_embed"][:, 1:]
  return out, "dinov2", ["mask_token"]
