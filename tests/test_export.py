"""SavedModel export: parity with JAX, both towers, any batch and image size.

The checkpoints here are not trained: a freshly initialised state is
perturbed (parameters and BatchNorm statistics) and saved, which exercises
the same restore/convert path as a trained one, with non-trivial BatchNorm
statistics, without compiling a train step (minutes on a loaded CPU).
The references are `load_embed_fn` and a direct `model.apply` on the
variables that were saved.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import build, checkpoint, data as data_lib, inference, train
from jaxdml.apps import export
from test_train import ROOT, load_config

tf = pytest.importorskip("tensorflow")

STEP = 7
TOL = 1e-4


def two_tower_config():
  """The SBIR smoke config with a ViT sketch tower and a ShuffleNet photo tower."""
  config = load_config("sketchy_rtl.py")
  head = dict(embed_dim=16, head_norm="bn", pooling="avg")
  config.model.query = dict(name="vit_tiny", **dict(head, pooling="cls"))
  config.model.gallery = dict(name="shufflenet_v2_tiny", **head)
  return config


def single_config():
  """One ResNet encoder (`task="single"`), L2-normalised embeddings."""
  config = load_config("sketchy_rtl.py")
  config.task = "single"
  config.model = dict(name="resnet_tiny", embed_dim=16, head_norm="l2", pooling="avg")
  return config


def random_value(path, leaf, rng):
  """A plausible random value for one leaf of the abstract train state."""
  name = jax.tree_util.keystr(path)
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return np.zeros(leaf.shape, leaf.dtype)
  if "var" in name:  # BatchNorm running variance: positive, away from 1.
    return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
  if "scale" in name:
    return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim >= 2 else 100
  return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)


def save_random_checkpoint(config, workdir):
  """Saves a random train state at STEP; returns (model, variables).

  Shapes come from `jax.eval_shape` and values from numpy: initialising the
  models for real compiles for ~20 s on a loaded 2-core CPU, and random
  values (BatchNorm statistics included) are a stronger parity check.
  """
  parts = build.build(config)
  model, abstract = parts.model, parts.abstract
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: random_value(p, x, rng), abstract)
  state["step"] = np.asarray(STEP, np.int32)
  ckpt = checkpoint.Checkpointer(workdir, model_config=config.model, async_save=False)
  ckpt.save(STEP, state)
  ckpt.close()
  variables = {"params": state["params"]}
  if jax.tree.leaves(state["batch_stats"]):
    variables["batch_stats"] = state["batch_stats"]
  return model, variables


def images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def apply(model, variables, x, method):
  """The encoder applied directly, as evaluation does (the export's reference)."""
  fn = jax.jit(lambda v, x: model.apply(v, data_lib.normalize(x), train=False,
                                        method=method)[0])
  return np.asarray(fn(variables, x))


def serve(saved, signature, x):
  return saved.signatures[signature](images=tf.constant(x))["embeddings"].numpy()


@pytest.fixture(scope="module")
def two_tower_export(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_tower"))
  config = two_tower_config()
  model, variables = save_random_checkpoint(config, workdir)
  path = export.export_saved_model(config, workdir)
  return config, model, variables, path


def test_two_tower_export_matches_jax_for_both_towers(two_tower_export):
  config, model, variables, path = two_tower_export
  assert path == os.path.join(os.path.dirname(path), "export")
  saved = tf.saved_model.load(path)
  assert set(saved.signatures) == {"serving_default", "query"}
  assert int(saved.image_size.numpy()) == 32
  with open(os.path.join(path, export.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["step"] == STEP and manifest["image_size"] == 32
  assert manifest["platforms"]["query"] == ["cpu", "cuda", "tpu"]
  spec = saved.signatures["query"].structured_input_signature[1]["images"]
  assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]

  for tower, signature, method in (("gallery", "serving_default", "embed_gallery"),
                                   ("query", "query", "embed_query")):
    jax_fn = export.load_embed_fn(path, tower)
    for batch in (3, 5):  # Two batch sizes through one polymorphic graph.
      x = images((batch, 32, 32, 3), seed=batch)
      got = serve(saved, signature, x)
      direct = apply(model, variables, x, method)
      assert got.shape == (batch, 16) and got.dtype == np.float32
      np.testing.assert_allclose(got, jax_fn(x), atol=TOL, rtol=TOL)
      np.testing.assert_allclose(got, direct, atol=TOL, rtol=TOL)
  # The signatures run different towers.
  x = images((3, 32, 32, 3))
  assert np.abs(serve(saved, "query", x) - serve(saved, "serving_default", x)).max() > 0.1


def test_other_image_sizes_are_resized_in_the_graph(two_tower_export):
  _, _, _, path = two_tower_export
  saved = tf.saved_model.load(path)
  jax_fn = export.load_embed_fn(path, "query")
  # TF's bilinear resize (half-pixel centres, no antialias) and
  # jax.image.resize(antialias=False) sample the same points; only float
  # rounding differs, so the tolerance stays 1e-4.
  for shape in ((2, 48, 40, 3), (2, 20, 24, 3), (2, 16, 16, 3)):
    x = images(shape)
    got = serve(saved, "query", x)
    assert got.shape == (2, 16)
    np.testing.assert_allclose(got, jax_fn(x), atol=TOL, rtol=TOL)


def test_single_encoder_export_has_one_signature(tmp_path):
  config = single_config()
  model, variables = save_random_checkpoint(config, str(tmp_path))
  path = export.export_saved_model(config, str(tmp_path))
  saved = tf.saved_model.load(path)
  assert set(saved.signatures) == {"serving_default"}
  x = images((4, 32, 32, 3))
  got = serve(saved, "serving_default", x)
  direct = apply(model, variables, x, None)
  np.testing.assert_allclose(got, direct, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, export.load_embed_fn(path)(x), atol=TOL, rtol=TOL)
  with pytest.raises(ValueError, match="'query' exists only for two-tower"):
    export.load_embed_fn(path, "query")


def with_eig(embed):
  """`embed` plus an `eig` (a LAPACK call on CPU, no TPU or portable CUDA lowering)."""
  def fn(variables, images):
    return embed(variables, images) + 0.0 * jnp.real(jnp.linalg.eigvals(jnp.eye(2))).sum()
  return fn


def test_platforms_that_lower_keeps_only_those():
  embed = lambda v, x: x.mean(axis=(1, 2, 3))[:, None] * v["w"]
  variables = {"w": np.ones(2, np.float32)}
  assert export._platforms_that_lower(
      with_eig(embed), variables, 4, ("cpu", "cuda", "tpu")) == ("cpu",)
  with pytest.raises(ValueError, match="does not lower for any of the platforms"):
    export._platforms_that_lower(with_eig(embed), variables, 4, ("tpu",))


def test_export_drops_a_platform_without_a_lowering(tmp_path, monkeypatch):
  config = single_config()
  save_random_checkpoint(config, str(tmp_path))
  real = inference.embed_fn
  monkeypatch.setattr(inference, "embed_fn", lambda m, method=None: with_eig(real(m, method)))
  path = export.export_saved_model(config, str(tmp_path))
  with open(os.path.join(path, export.MANIFEST)) as f:
    assert json.load(f)["platforms"] == {"serving_default": ["cpu"]}
  # TF's runtime lacks JAX's LAPACK custom calls, so the graph is only loaded.
  assert set(tf.saved_model.load(path).signatures) == {"serving_default"}


def test_unknown_platform_is_named(tmp_path):
  with pytest.raises(ValueError, match="'gpu'.*one of"):
    export.export_saved_model(single_config(), str(tmp_path), platforms=("cpu", "gpu"))


def test_missing_step_names_the_saved_steps(two_tower_export):
  config, _, _, path = two_tower_export
  with pytest.raises(FileNotFoundError, match=rf"step 3 .* steps \[{STEP}\]"):
    export.export_saved_model(config, os.path.dirname(path), step=3)


def test_export_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*--mode=train"):
    export.export_saved_model(single_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")
  assert not os.path.exists(tmp_path / "export")


def test_cli_export_mode(tmp_path):
  save_random_checkpoint(load_config("sketchy_rtl.py"), str(tmp_path))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, "-m", "jaxdml.main", "--config=configs/sketchy_rtl.py:smoke",
       f"--workdir={tmp_path}", "--mode=export"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"SavedModel written to {tmp_path / 'export'}" in result.stdout
  saved = tf.saved_model.load(str(tmp_path / "export"))
  assert set(saved.signatures) == {"serving_default", "query"}
