"""TF SavedModel export of trained encoders, via jax2tf.

    python -m jaxdml.main --config=... --workdir=DIR --mode=export

writes `DIR/export/` from the latest checkpoint: signatures take `images`
(uint8 [batch, H, W, 3], any batch size and any H, W) and return
`embeddings` (float32). `serving_default` is the gallery encoder; two-tower
models (SBIR) also get `query`, the sketch encoder. Resizing to the
config's image size (bilinear, no antialiasing, in TF: jax.image.resize
needs static H, W) and normalisation (in the converted JAX function) happen
inside the graph. The image size is saved as the variable `image_size` and,
with the step, platforms and config, in `export/jaxdml_export.json`.
`load_embed_fn` rebuilds the JAX function the export was made from (from
the checkpoint the manifest names) so anyone can check parity.

The converted function is lowered for cpu, cuda and tpu at once (one
SavedModel for all three), each with its own kernels and, for
`model.dtype="auto"`, its own compute dtype (float32 on CPU, bfloat16 on GPU
and TPU; `jaxdml.inference.Towers.fns(portable=True)`); a platform some op has no
lowering for is dropped with a warning, and the manifest's `platforms` lists
what each signature kept. cuDNN attention needs a GPU host to be traced: an
export made elsewhere runs XLA's attention on GPU. Export runs in one
process on one device: it needs only the parameters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdml import config as config_lib
from jaxdml import extras, inference, paths, tasks

EXPORT_DIR = "export"
MANIFEST = "jaxdml_export.json"
# Lowered for all three so one SavedModel serves on CPU, GPU and TPU.
PLATFORMS = ("cpu", "cuda", "tpu")
_KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Signature -> tower: the gallery tower serves by default; two-tower models
# (SBIR) also export the query tower.
_SIGNATURES = {"serving_default": "gallery", "query": "query"}


def _signatures(config) -> dict:
  """Signature name -> tower, for the towers this model has."""
  towers = tasks.towers(config.task)
  distinct = towers["query"] != towers["gallery"]
  return {sig: tower for sig, tower in _SIGNATURES.items() if tower == "gallery" or distinct}


def _restore_variables(config, workdir: str, step: int | None = None):
  """`(restored model, numpy variables, step)` of the workdir's checkpoint,
  on one local device: the parameters are replicated, so any layout restores."""
  model = inference.restore(workdir, config, step=step, devices=jax.local_devices()[:1])
  return model, jax.device_get(model.variables), model.step


def _platforms_that_lower(embed, variables, size: int, platforms) -> tuple:
  """The platforms, of those whose joint lowering failed, that lower alone.

  Failing ones are dropped with a warning, so a CPU/GPU export still comes
  out when, say, one op has no TPU lowering; none at all is an error.
  """
  b, = jax.export.symbolic_shape("b")
  args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables),
          jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32))
  errors = {}
  for platform in platforms:
    try:
      jax.export.export(jax.jit(embed), platforms=(platform,))(*args)
    except Exception as err:  # pylint: disable=broad-except
      errors[platform] = str(err)[:500]
  ok = tuple(p for p in platforms if p not in errors)
  if not ok:
    raise ValueError(f"The encoder does not lower for any of the platforms "
                     f"{platforms}: {errors}")
  logging.warning("Export: dropping platforms %s, which do not lower: %s",
                  sorted(errors), errors)
  return ok


def _serving_fn(tf, converted, variables, size: int):
  """A tf.function `images (uint8) -> {"embeddings": ...}` for one tower."""
  def serve(images):
    resized = tf.image.resize(tf.cast(images, tf.float32), (size, size),
                              method="bilinear", antialias=False)
    return {"embeddings": converted(variables, resized)}
  return tf.function(serve, autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])


def export_saved_model(config, workdir: str, *, step: int | None = None,
                       platforms=PLATFORMS) -> str:
  """Writes the SavedModel of `workdir`'s checkpoint to `workdir/export`.

  `step` picks a checkpoint (default: the latest); `platforms` are those the
  converted function is lowered for (a platform it cannot be lowered for is
  dropped with a warning; the manifest lists those kept). The directory is
  replaced only once the new export is complete. Returns its path.
  """
  tf = extras.require("tensorflow", "the TF SavedModel export")
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in _KNOWN_PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"platforms={platforms}: each must be one of "
                     f"{_KNOWN_PLATFORMS}, e.g. platforms=('cpu', 'cuda').")
  model, variables, step = _restore_variables(config, workdir, step)
  config = model.config
  embed_fns = model.towers.fns(portable=True)
  size = int(config.data.image_size)
  module = tf.Module()
  # Parameters as tf.Variables: stored once, shared by both signatures. The
  # tree stays a plain dict (a tracked module attribute would be wrapped,
  # which JAX's tree functions do not see through); the flat list is tracked.
  tf_variables = jax.tree.map(lambda x: tf.Variable(x, trainable=False), variables)
  module.flat_variables = jax.tree.leaves(tf_variables)
  module.image_size = tf.Variable(size, trainable=False, dtype=tf.int32)
  signatures, lowered = {}, {}
  for signature, tower in _signatures(config).items():
    embed = embed_fns[tower]

    def make(subset, embed=embed):
      converted = jax2tf.convert(
          embed, with_gradient=False,
          polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
          native_serialization_platforms=subset)
      fn = _serving_fn(tf, converted, tf_variables, size)
      return fn, fn.get_concrete_function()  # Lowers here.

    try:
      fn, concrete = make(platforms)
      lowered[signature] = platforms
    except Exception:  # pylint: disable=broad-except
      # One multi-platform lowering is the common case; only on failure are
      # the platforms tried one by one.
      lowered[signature] = _platforms_that_lower(embed, variables, size, platforms)
      fn, concrete = make(lowered[signature])
    setattr(module, signature, fn)
    signatures[signature] = concrete
  path = paths.join(workdir, EXPORT_DIR)
  # TensorFlow writes on a local disk (its GCS client cannot reach a storage
  # emulator); a bucket gets the finished export copied in.
  remote = paths.is_url(path)
  tmp = tempfile.mkdtemp(prefix="jaxdml-export-") if remote else path + ".tmp"
  if os.path.exists(tmp) and not remote:
    shutil.rmtree(tmp)
  tf.saved_model.save(module, tmp, signatures=signatures)
  manifest = {"step": step, "image_size": size, "workdir": os.fspath(paths.as_path(workdir)),
              "signatures": {k: tasks.towers(config.task)[t] or "__call__"
                             for k, t in _signatures(config).items()},
              "platforms": lowered, "config": json.loads(config.to_json())}
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    f.write(json.dumps(manifest, indent=2))
  if remote:
    paths.upload_tree(tmp, path, replace=True)
    shutil.rmtree(tmp)
    return path
  # Swap in the new export only when it is complete.
  if os.path.exists(path):
    shutil.rmtree(path)
  os.rename(tmp, path)
  return path


def load_saved_model(export_dir: str):
  """`tf.saved_model.load` of an export, local or on a bucket (copied to a
  temporary folder first: TensorFlow's GCS client cannot reach an emulator)."""
  tf = extras.require("tensorflow", "the TF SavedModel export")
  local = paths.LocalCopy(export_dir, download=True)
  try:
    return tf.saved_model.load(local.local)
  finally:
    local.close()


def read_manifest(export_dir: str) -> dict:
  """An export's `jaxdml_export.json` (step, image size, config, ...)."""
  manifest_path = paths.as_path(export_dir) / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(
        f"{manifest_path} not found: {export_dir} is not a jaxdml export; "
        "make one with --mode=export.")
  return json.loads(manifest_path.read_text())


def load_embed_fn(export_dir: str, tower: str = "gallery"):
  """The JAX function an export was made from: uint8 images -> embeddings.

  Restores the exported step from the checkpoint the manifest names (so it
  needs that workdir) and applies the same resize (bilinear, no antialias,
  here `jax.image.resize`) and normalisation. `tower` is `"gallery"`
  (`serving_default`) or, for two-tower models, `"query"`.
  """
  manifest = read_manifest(export_dir)
  config = config_lib.upgrade_saved(ml_collections.ConfigDict(manifest["config"]))
  towers = list(_signatures(config).values())
  if tower not in towers:
    raise ValueError(f"tower={tower!r}: this export has the towers {towers}; "
                     "'query' exists only for two-tower (sbir) models.")
  model, variables, _ = _restore_variables(config, manifest["workdir"], manifest["step"])
  size = int(manifest["image_size"])
  embed = jax.jit(model.towers.fns(portable=True)[tower])

  def fn(images):
    images = jnp.asarray(np.asarray(images), jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [batch, H, W, 3], got {images.shape}.")
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, 3),
                                method="bilinear", antialias=False)
    return embed(variables, images)
  return fn
