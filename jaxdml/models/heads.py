"""Pooling, L2 normalisation and the embedding head every encoder ends in.

Embedding head: pooling ("avg" | "gem" | "gem_l2" | "cls" | "avgmax") -> optional linear
projection to `embed_dim` -> `head_norm` ("bn" | "l2" | "none").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdml.models.layers import BatchNorm, at_least_float32

POOLINGS = ("avg", "gem", "gem_l2", "cls", "avgmax")
# Poolings with GeM's learnable exponent p.
GEM_POOLINGS = ("gem", "gem_l2")
HEAD_NORMS = ("bn", "l2", "none")
# Parameters under this module name are never in torchvision/timm checkpoints;
# `load_torch_weights` initialises them freshly.
HEAD_NAME = "embed_head"


def l2_normalize(x, eps: float = 1e-12):
  """Rows of `x` divided by their L2 norm (at least float32), safe at zero."""
  x = at_least_float32(x)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def check_head_options(*, pooling, head_norm, num_classes, embed_dim, allowed_pooling):
  """Raises ValueError naming the bad option; shared by all encoders."""
  if pooling not in allowed_pooling:
    raise ValueError(f"pooling={pooling!r} is not supported here; use one of {allowed_pooling}.")
  if head_norm not in HEAD_NORMS:
    raise ValueError(f"head_norm={head_norm!r} is unknown; use one of {HEAD_NORMS}.")
  if num_classes is not None and embed_dim is not None:
    raise ValueError("num_classes and embed_dim are exclusive: num_classes gives classifier "
                     "logits (torchvision layout), embed_dim an embedding; set only one.")
  if num_classes is not None and pooling not in ("avg", "cls"):
    raise ValueError(f"pooling={pooling!r} with num_classes: the torchvision/timm classifier "
                     "layout uses 'avg' (CNN) or 'cls' (ViT) pooling.")


def pool(local, *, kind: str, cls=None, p=None, eps: float = 1e-6):
  """Pools local features `[B, N, C]` (CNN positions or ViT patch tokens) to `[B, C]`.

  "avgmax" is the sum of average and max pooling (the Proxy-Anchor/OBD-SD
  convention; our choice where OBD-SD's text says only "avg+max"), so the width
  stays C. GeM clamps at `eps` before the power, as in cirtorch. "gem_l2" is
  GeM followed by L2 normalisation, cirtorch's pooling block, which RAML's
  code (pavelsuma/raml) puts before its projection.
  """
  if kind == "avg":
    return jnp.mean(at_least_float32(local), axis=1)
  if kind == "avgmax":
    lf = at_least_float32(local)
    return jnp.mean(lf, axis=1) + jnp.max(lf, axis=1)
  if kind in GEM_POOLINGS:
    x = jnp.maximum(at_least_float32(local), eps)
    pooled = jnp.mean(x ** p, axis=1) ** (1.0 / p)
    return l2_normalize(pooled) if kind == "gem_l2" else pooled
  if kind == "cls":
    if cls is None:
      raise ValueError("pooling='cls' needs a CLS token; only ViT encoders have one.")
    return at_least_float32(cls)
  raise ValueError(f"unknown pooling {kind!r}; use one of {POOLINGS}.")


class EmbeddingHead(nn.Module):
  """Pooling -> optional Linear(embed_dim) -> head_norm; returns (embedding, pooled).

  "bn" is the SBIR recipe's BatchNorm embedding (BatchNorm1d with affine,
  torch defaults; our choice where the paper is silent); it keeps its own
  statistics even when the backbone BN is frozen. GeM's p is a learnable
  scalar initialised to 3. The whole head (pooling, projection, BN, L2) runs
  in float32 whatever the backbone's compute dtype: it is a sliver of the
  FLOPs, and a bf16 projection would round every embedding to 8 bits of
  mantissa before the loss compares them.
  """
  pooling: str = "avg"
  embed_dim: int | None = None
  head_norm: str = "l2"

  @nn.compact
  def __call__(self, local, cls=None, train: bool = False, pooled_norm=None):
    """`pooled_norm`: the encoder's own norm of pooled features (ConvNeXt's
    `head.norm`), applied right after pooling; its variables stay the encoder's."""
    p = None
    if self.pooling in GEM_POOLINGS:
      p = self.param("p", nn.initializers.constant(3.0), (1,), jnp.float32)[0]
    pooled = pool(local, kind=self.pooling, cls=cls, p=p)
    if pooled_norm is not None:
      pooled = pooled_norm(pooled)
    z = pooled
    if self.embed_dim is not None:
      # A bias before BatchNorm is cancelled by it: its true gradient is zero,
      # and Adam would turn float noise in that gradient into lr-sized steps.
      z = nn.Dense(self.embed_dim, use_bias=self.head_norm != "bn", dtype=z.dtype,
                   name="proj")(z)
    if self.head_norm == "bn":
      z = BatchNorm(dtype=z.dtype, name="bn")(z, train)
    elif self.head_norm == "l2":
      z = l2_normalize(z)
    return z, pooled


def encoder_output(local, *, cls=None, num_classes, classifier_name, pooling, embed_dim,
                   head_norm, train, pooled_norm=None, classifier=None):
  """The common end of every encoder, called inside its compact `__call__`.

  With `num_classes`: pooled features -> Dense named `classifier_name` ("fc" in
  torchvision, "head" in timm; or the encoder's own `classifier` module),
  logits out. Otherwise the `EmbeddingHead`. `pooled_norm` (a callable, e.g.
  ConvNeXt's `head.norm`) normalises the pooled features in both paths.
  Returns `(output, {"features": pooled})`.
  """
  if num_classes is not None:
    pooled = pool(local, kind=pooling, cls=cls)
    if pooled_norm is not None:
      pooled = pooled_norm(pooled)
    if classifier is None:
      classifier = nn.Dense(num_classes, dtype=pooled.dtype, name=classifier_name)
    return classifier(pooled), {"features": pooled}
  z, pooled = EmbeddingHead(pooling=pooling, embed_dim=embed_dim, head_norm=head_norm,
                            name=HEAD_NAME)(local, cls, train, pooled_norm)
  return z, {"features": pooled}
