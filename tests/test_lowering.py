"""What each platform's lowering contains, checked on this CPU-only host.

`jax.jit(f).trace(...).lower(lowering_platforms=(p,))` lowers for a platform
this machine does not have. GPU and TPU must get XLA's own grouped and 7x7
stem convolutions and reduce-window pooling (what cuDNN and the MXU run
best); the CPU lowering must keep its rewrites (shifted multiply-adds,
im2col matmuls, separable pooling), which make the CPU train step fast.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import build, inference, models, sharding, train
from jaxdml import config as config_lib
from jaxdml.models import vit

ACCELERATORS = ("cuda", "tpu")


def lowered(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def convolutions(text):
  """(kernel shape, feature_group_count, operand dtype) of every convolution."""
  found = []
  for line in text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    groups = int(re.search(r"feature_group_count = (\d+)", line).group(1))
    lhs, rhs = re.search(r": \(tensor<([^>]*)>, tensor<([^>]*)>\)", line).groups()
    *kernel, dtype = rhs.split("x")
    found.append((tuple(int(k) for k in kernel), groups, dtype))
  return found


def encoder(name, dtype="float32"):
  model = models.get(name, embed_dim=8, dtype=dtype)
  images = jnp.zeros((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  return (lambda v, x: model.apply(v, x)[0]), variables, images


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_accelerators_get_xla_convolutions_and_reduce_window(platform):
  fn, variables, images = encoder("shufflenet_v2_tiny")
  text = lowered(fn, variables, images, platform=platform)
  convs = convolutions(text)
  # ShuffleNet-tiny: one stride-2 block per stage, whose two branches each
  # have a depthwise layer (input width, then half the output width).
  depthwise = sorted(groups for kernel, groups, _ in convs if groups > 1)
  assert depthwise == [8, 8, 16, 16, 32, 32]
  assert ((3, 3, 3, 8), 1, "f32") in convs  # the stem, one convolution
  assert text.count("stablehlo.reduce_window") >= 1  # max pooling (and avg pool's sum)

  fn, variables, images = encoder("resnet_tiny")
  convs = convolutions(lowered(fn, variables, images, platform=platform))
  assert ((7, 7, 3, 8), 1, "f32") in convs


def test_cpu_keeps_its_rewrites():
  fn, variables, images = encoder("shufflenet_v2_tiny")
  text = lowered(fn, variables, images, platform="cpu")
  assert convolutions(text) == []  # depthwise, stem and 1x1: no convolution op at all
  assert "reduce_window" not in text
  fn, variables, images = encoder("resnet_tiny")
  assert all(kernel[:2] != (7, 7) for kernel, _, _ in
             convolutions(lowered(fn, variables, images, platform="cpu")))


def test_train_step_lowers_for_accelerators_in_bfloat16():
  """The whole jitted train step (a ShuffleNet query tower, a ResNet gallery
  tower, bf16 compute) lowers for cuda and tpu from here; the convolutions
  run in bf16 while BatchNorm statistics and the loss stay float32."""
  config = config_lib.load_config("configs/sketchy_rtl.py", "smoke")
  config.model.query.name = "shufflenet_v2_tiny"
  config.model.query.dtype = config.model.gallery.dtype = "bfloat16"
  parts = build.build(config)
  step = train.make_train_step(parts)
  size, b = int(config.data.image_size), int(config.batch_size)
  batch_sharding = sharding.batch_sharding(parts.mesh)
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=batch_sharding)
  batch = {"sketch": image, "photo": image,
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
  cpu_text = step.trace(parts.restore_target(), batch).lower(
      lowering_platforms=("cpu",)).as_text()
  assert all(groups == 1 for _, groups, _ in convolutions(cpu_text))
  leaves = len(jax.tree.leaves(parts.abstract))
  for platform in ACCELERATORS:
    text = step.trace(parts.restore_target(), batch).lower(
        lowering_platforms=(platform,)).as_text()
    convs = convolutions(text)
    assert any(groups > 1 for _, groups, _ in convs)
    assert any(kernel[:2] == (7, 7) for kernel, _, _ in convs)
    assert {dtype for _, _, dtype in convs} == {"bf16"}
    # The non-finite guard: one select per state leaf (but `step`, set after
    # it) here, where the CPU lowering keeps its lax.cond (the CPU has no
    # device-to-host copy of the predicate to avoid).
    wheres = lambda t: len(re.findall(r"call @_where", t))  # jnp.where, outlined
    assert wheres(text) - wheres(cpu_text) == leaves - 1


def test_auto_dtype_is_resolved_per_platform():
  assert models.compute_dtype("auto", "cpu") == "float32"
  assert models.compute_dtype("auto", "gpu") == models.compute_dtype("auto", "tpu") == "bfloat16"
  assert models.compute_dtype(jnp.bfloat16) == "bfloat16"
  with pytest.raises(ValueError, match="float8.*use one of"):
    models.compute_dtype("float8")
  spec = models.with_dtype({"name": "two_tower", "query": {"name": "a"},
                            "gallery": {"name": "b", "dtype": "float32"}}, "bfloat16")
  assert spec == {"name": "two_tower", "query": {"name": "a", "dtype": "bfloat16"},
                  "gallery": {"name": "b", "dtype": "bfloat16"}}


def test_portable_export_functions_pick_the_dtype_when_lowered():
  """Export lowers one function for cpu, cuda and tpu from whatever host:
  "auto" must give bf16 convolutions in the accelerator lowerings and
  float32 in the CPU one, from the same float32 parameters."""
  config = config_lib.load_config("configs/sketchy_rtl.py", "smoke")
  parts = build.build(config, devices=jax.devices()[:1])
  fn = parts.tower_fns(portable=True)["gallery"]
  variables = jax.eval_shape(lambda r: build.model_variables(parts.init(r)), jax.random.key(0))
  size = int(config.data.image_size)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  dtypes = {p: {d for _, _, d in convolutions(lowered(fn, variables, images, platform=p))}
            for p in ("cpu", "cuda", "tpu")}
  assert dtypes == {"cpu": {"f32"}, "cuda": {"bf16"}, "tpu": {"bf16"}}


def reference_attention(q, k, v):
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_fallback_matches_the_formula(dtype, tol):
  """Where cuDNN cannot be traced (this host; float32 anywhere), `attention`
  is XLA's; it must equal softmax(q k^T / sqrt(d)) v. On a GPU host the cuda
  branch is cuDNN's, compared with this one by `jaxdml.device_check`."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 3, 16)), dtype) for _ in range(3))
  assert not vit._cudnn_attention_traces(q.shape, k.shape, jnp.dtype(jnp.float32))
  if jax.default_backend() == "cpu":
    assert not vit._cudnn_attention_traces(q.shape, k.shape, jnp.dtype(dtype))
  out = jax.jit(vit.attention)(q, k, v)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), reference_attention(q, k, v),
                             atol=tol, rtol=tol)
