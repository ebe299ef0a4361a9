"""Load torchvision / timm state dicts into jaxdml encoders.

Flax names mirror torch keys: a module `layer1_0` is torch's `layer1.0`
(a trailing `_<int>` becomes `.<int>`), and leaves map as
`kernel -> weight` (conv `[kh,kw,in,out] <- [out,in,kh,kw]`, dense
`[in,out] <- [out,in]`), LayerNorm/BatchNorm `scale -> weight`, `bias -> bias`,
BatchNorm statistics `mean -> running_mean`, `var -> running_var`; other leaves
(`cls_token`, `pos_embed`) keep their names.

Every source key is consumed or reported. Deliberate exceptions, our choices:
- `num_batches_tracked` is ignored (Flax BatchNorm has no counter);
- without `num_classes`, the checkpoint's classifier (`fc.*` torchvision,
  `head.*` timm) is dropped and listed under "dropped", not an error, since
  loading ImageNet weights into an embedding model is the common case;
- the embedding head (`embed_head/...`: GeM p, projection, "bn") is never in
  such checkpoints and is freshly initialised (listed under "fresh").
A ViT `pos_embed` stored for another grid is resampled bicubically to the
model's `image_size`, CLS/register rows kept, as timm's checkpoint filter does
(listed under "resampled"). open_clip's CLIP (`visual.*`) and the original
DINOv2 checkpoints are renamed to timm's keys first (`timm_layouts`; the
text tower and DINOv2's `mask_token` are listed under "dropped").
"""
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdml.models import heads, timm_layouts
from jaxdml.models.pos_embed import resample_pos_embed

_CLASSIFIER_PREFIXES = ("fc.", "head.")
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_key(path: tuple[str, ...]) -> str:
  """torch state-dict key for a flattened Flax variable path `(collection, *modules, leaf)`."""
  collection, *modules, leaf = path
  parts = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", m) for m in modules]
  return ".".join(parts + [_LEAF_NAMES.get((collection, leaf), leaf)])


def _to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  if leaf == "kernel" and arr.ndim == 2:
    return arr.T
  return arr


def _torch_shape(shape: tuple, leaf: str) -> tuple:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  return tuple(shape)


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _init_head(model, shapes, rng, images):
  """Fresh embedding-head variables, initialising the head alone.

  A whole-model init compiles one RNG per parameter, tens of seconds for a
  ResNet on CPU; the head needs only its input width.
  """
  variables = flax.traverse_util.unflatten_dict(shapes)
  _, inter = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  width = inter["features"].shape[-1]
  head = heads.EmbeddingHead(pooling=model.pooling, embed_dim=model.embed_dim,
                             head_norm=model.head_norm)
  local, cls = jnp.zeros((1, 1, width)), jnp.zeros((1, width))
  head_vars = head.init(jax.random.fold_in(rng, 1), local, cls, train=False)
  flat = flax.traverse_util.flatten_dict(head_vars)
  return {(c, heads.HEAD_NAME, *rest): v for (c, *rest), v in flat.items()}


def read_state_dict(source) -> dict[str, np.ndarray]:
  """A state dict as numpy arrays from a dict or a `.npz` / `.safetensors` / `.pth` path.

  `.pth`/`.pt`/`.bin` need torch (imported lazily); a checkpoint wrapping the
  weights under "state_dict" or "model" (DeiT) is unwrapped.
  """
  if isinstance(source, dict):
    return {k: _as_numpy(v) for k, v in source.items()}
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    from jaxdml import extras  # pylint: disable=g-import-not-at-top
    return dict(extras.require("safetensors.numpy", f"reading {path!r}").load_file(path))
  if path.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs torch (pip install torch); or convert it once "
                        "to .safetensors/.npz elsewhere and load that.") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
      if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
        sd = sd[wrapper]
    return {k: _as_numpy(v) for k, v in sd.items()}
  raise ValueError(f"unsupported weights file {path!r}: use .npz, .safetensors or .pth, "
                   "or pass a dict of numpy arrays.")


def load_torch_weights(name: str, source, *, strict: bool = True, seed: int = 0,
                       pos_embed_antialias: bool = True, **kwargs):
  """Variables for `models.get(name, **kwargs)` from a torchvision/timm state dict.

  Args:
    name: registered encoder name, e.g. "resnet50", "vit_s16".
    source: dict of arrays with torch key names (timm's, torchvision's, or
      open_clip's/DINOv2's, see `timm_layouts`), or a `.npz`, `.safetensors`
      or `.pth` path.
    strict: True raises ValueError listing unused source keys and missing model
      parameters; False returns `(variables, report)` instead, with missing
      parameters freshly initialised.
    seed: PRNG seed for the freshly initialised parameters (embedding head).
    pos_embed_antialias: the bicubic filter resampling a ViT `pos_embed`
      stored for another grid; True is timm's checkpoint filter (and
      `resample_abs_pos_embed`'s default), False torch's plain bicubic.
    **kwargs: model kwargs (embed_dim, pooling, head_norm, num_classes,
      image_size, ...). For a ViT, `image_size` other than the checkpoint's
      resamples `pos_embed` (bicubic; DINOv2's 518 px tables at 224 px).

  Returns:
    `{"params": ..., "batch_stats": ...}` (strict) or `(variables, report)`
    with report keys "unused", "missing", "fresh", "dropped", "resampled"
    and "layout" ("timm", "open_clip" or "dinov2": how the keys were read).
    A shape mismatch always raises, naming the torch key.
  """
  from jaxdml import models  # the registry imports this module

  model = models.get(name, **kwargs)
  size = getattr(model, "image_size", 224)
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  rng = jax.random.key(seed)
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda r, x: model.init(r, x, train=False), rng, images))
  src, layout, dropped = timm_layouts.to_timm(read_state_dict(source))
  out, used = {}, set()
  report = {"unused": [], "missing": [], "fresh": [], "dropped": dropped, "resampled": [],
            "layout": layout}
  for path, target in shapes.items():
    key, leaf = torch_key(path), path[-1]
    if key not in src:
      (report["fresh"] if heads.HEAD_NAME in path else report["missing"]).append(key)
      continue
    arr = _to_flax(np.asarray(src[key]), leaf)
    if key == "pos_embed" and arr.ndim == 3 and arr.shape != target.shape:
      g = model.image_size // model.patch_size
      arr = np.asarray(resample_pos_embed(
          jnp.asarray(arr, jnp.float32), (g, g), num_prefix_tokens=model.num_pos_prefix_tokens,
          antialias=pos_embed_antialias))
      report["resampled"].append(key)
    if arr.shape != target.shape:
      raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(src[key].shape)}, model "
                       f"expects {_torch_shape(target.shape, leaf)} (torch layout) for "
                       f"{'/'.join(path)}. Check the model name and kwargs.")
    out[path] = jnp.asarray(arr, target.dtype)
    used.add(key)
  for key in src:
    if key in used or key.endswith("num_batches_tracked"):
      continue
    classifier = key.startswith(_CLASSIFIER_PREFIXES) and getattr(model, "num_classes", 1) is None
    report["dropped" if classifier else "unused"].append(key)
  if strict and (report["unused"] or report["missing"]):
    raise ValueError(
        f"torch weights do not match {name!r}: unused source keys {report['unused']}; "
        f"model parameters missing from the source {report['missing']}. Check the model "
        "name/kwargs, or pass strict=False to get the report and fresh parameters.")
  if report["missing"]:
    init = flax.traverse_util.flatten_dict(
        jax.jit(lambda r, x: model.init(r, x, train=False))(rng, images))
    for path in shapes:
      out.setdefault(path, init[path])
  elif report["fresh"]:
    out.update(_init_head(model, shapes, rng, images))
  variables = flax.traverse_util.unflatten_dict(out)
  return variables if strict else (variables, report)
