"""Proxy and classification losses: one learnable vector per class.

Each equals pytorch-metric-learning 2.9.0's loss of the same kind with its
default distance and reducer, in value and in gradients w.r.t. embeddings
and proxies. The class vectors are `loss_params["proxies"]`, shape
`[num_classes, dim]` (row c is class c); PML keeps some as `W` of shape
`[dim, num_classes]`: ours is its transpose. `init_params(rng, *,
num_classes, dim)` draws them as PML initialises its tensor (distribution,
not the same numbers). The number of classes and the width come from the
arrays. Labels must lie in [0, num_classes).

Every loss here allocates [B, C] (batch x classes) and nothing larger.
A reference set is rejected, as in PML. `reduction=` is any reducer of
jaxdml.losses.reducers over PML's per-element losses: one per sample
(kind "element"), for proxy_anchor one per proxy in "pos_loss" and
"neg_loss" with PML's divisors (the proxies with a positive, all proxies).
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from jaxdml.losses import distances
from jaxdml.losses import pairs
from jaxdml.losses import reducers
from jaxdml.losses.softmax_pairs import masked_logsumexp


def _normal_init(std_fn):
  def init(rng, *, num_classes, dim, **hparams):
    del hparams
    std = std_fn(num_classes, dim)
    return {"proxies": std * jax.random.normal(rng, (num_classes, dim), jnp.float32)}
  return init


# torch.nn.init.normal_ (PML's default weight init): N(0, 1).
init_normal = _normal_init(lambda c, d: 1.0)
# ProxyAnchor's kaiming_normal_(mode="fan_out") on a [C, D] tensor: std sqrt(2 / C).
init_kaiming_fan_out = _normal_init(lambda c, d: math.sqrt(2.0 / c))


def prepare(name: str, embeddings: jax.Array, labels: jax.Array,
            loss_params: Mapping[str, jax.Array],
            ref_set: Mapping[str, jax.Array | None]
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Checks the inputs of a loss with class vectors: (embeddings [B, D] at
  least float32, proxies [C, D], labels [B], their one-hot [B, C]).
  `ref_set` (`refs(...)`) must be empty."""
  pairs.reject_ref(name, **ref_set)
  x = distances.as_float(embeddings)
  proxies = distances.as_float(loss_params["proxies"])
  if x.ndim != 2 or proxies.ndim != 2 or proxies.shape[1] != x.shape[1]:
    raise ValueError(f"{name}: embeddings [B, D] and loss_params['proxies'] [C, D] must share "
                     f"D; got {x.shape} and {proxies.shape}.")
  labels = jnp.asarray(labels)
  if labels.shape != (x.shape[0],):
    raise ValueError(f"{name}: labels must be [{x.shape[0]}], got {labels.shape}.")
  one_hot = jax.nn.one_hot(labels, proxies.shape[0], dtype=x.dtype)
  return x, proxies, labels, one_hot


def cross_entropy(logits: jax.Array, one_hot: jax.Array) -> jax.Array:
  """Per-row softmax cross-entropy (torch.nn.CrossEntropyLoss, no reduction).

  `logits`, `one_hot` float [B, C]; the result float [B].
  """
  return -jnp.sum(one_hot * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _finish(name, losses, reduction, labels):
  """(loss, {}) from the per-sample losses (a reducers.Term, or an array of
  "element" losses over the batch) reduced by `reduction`."""
  term = losses if isinstance(losses, reducers.Term) else reducers.Term(losses, "element")
  return reducers.finish({"loss": term}, reduction, labels=labels, loss_name=name)[0], {}


def refs(ref_embeddings: jax.Array | None, ref_labels: jax.Array | None,
         ref_valid: jax.Array | None,
         ref_self_index: jax.Array | None) -> dict[str, jax.Array | None]:
  """The reference-set arguments as one dict, for `prepare` (which rejects a non-empty one)."""
  return dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, ref_valid=ref_valid,
              ref_self_index=ref_self_index)


def proxy_anchor(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
                 margin: float = 0.1, alpha: float = 32.0, ref_embeddings: jax.Array | None = None,
                 ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
                 ref_self_index: jax.Array | None = None,
                 reduction: reducers.Reduction = "divisor") -> reducers.LossAndAux:
  """Proxy-Anchor (Kim et al. 2020), PML's `ProxyAnchorLoss`.

  For each proxy c with cosine s_ic to the batch: log(1 + sum over its
  positives of exp(-alpha (s_ic - margin))), averaged over the proxies that
  have a positive in the batch, plus log(1 + sum over its negatives of
  exp(alpha (s_ic + margin))), averaged over all proxies. Allocates [B, C].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, _, pos = prepare("proxy_anchor", embeddings, labels, loss_params,
                               refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  cos = distances.cosine_matrix(x, proxies)
  neg = 1.0 - pos

  # log(1 + sum over the batch's masked rows of exp(z)), per proxy; 0 without any.
  log1p_sum_exp = lambda z, mask: jax.nn.softplus(masked_logsumexp(z, mask > 0, axis=0))

  pos_term = log1p_sum_exp(alpha * (margin - cos), pos)
  neg_term = log1p_sum_exp(alpha * (cos + margin), neg)
  with_pos = jnp.sum(jnp.any(pos > 0, axis=0))
  # Per proxy ("element" over the C proxies), as PML lists them, with its divisors.
  value, parts = reducers.finish(
      {"pos_loss": reducers.Term(pos_term, "element", divisor=with_pos),
       "neg_loss": reducers.Term(neg_term, "element", divisor=proxies.shape[0])},
      reduction, labels=labels, loss_name="proxy_anchor")
  return value, parts


def proxy_nca(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
              softmax_scale: float = 1.0, ref_embeddings: jax.Array | None = None,
              ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
              ref_self_index: jax.Array | None = None,
              reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """ProxyNCA (Movshovitz-Attias et al. 2017), PML's `ProxyNCALoss`.

  Softmax over minus the squared distances of the L2-normalised embedding to
  the L2-normalised proxies (PML's LpDistance(power=2)), times
  `softmax_scale`; minus the log-probability of the own class, averaged
  over the batch (rows whose probability underflows to 0 are dropped, as in
  PML). Allocates [B, C].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, _, one_hot = prepare("proxy_nca", embeddings, labels, loss_params,
                                   refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  d2 = distances.squared_euclidean_matrix(distances.l2_normalize(x),
                                          distances.l2_normalize(proxies))
  log_p = jnp.sum(one_hot * jax.nn.log_softmax(-softmax_scale * d2, axis=-1), axis=-1)
  keep = jnp.exp(log_p) > 0
  return _finish("proxy_nca", reducers.Term(-log_p, "element", mask=keep), reduction, labels)


def normalized_softmax(*, embeddings: jax.Array, labels: jax.Array,
                       loss_params: Mapping[str, jax.Array], temperature: float = 0.05,
                       ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                       ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                       reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Normalized softmax (Zhai & Wu 2018), PML's `NormalizedSoftmaxLoss`:
  cross-entropy over cosine / temperature, averaged. Allocates [B, C].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, _, one_hot = prepare(
      "normalized_softmax", embeddings, labels, loss_params,
      refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  logits = distances.cosine_matrix(x, proxies) / temperature
  return _finish("normalized_softmax", cross_entropy(logits, one_hot), reduction, labels)


def cosface(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
            margin: float = 0.35, scale: float = 64.0, ref_embeddings: jax.Array | None = None,
            ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
            ref_self_index: jax.Array | None = None,
            reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """CosFace (Wang et al. 2018), PML's `CosFaceLoss`: cross-entropy over
  scale * (cosine - margin at the own class). Allocates [B, C].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, _, one_hot = prepare("cosface", embeddings, labels, loss_params,
                                   refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  cos = distances.cosine_matrix(x, proxies)
  return _finish("cosface", cross_entropy(scale * (cos - margin * one_hot), one_hot), reduction,
                 labels)


def _arcface_loss(cos, one_hot, margin, scale):
  """ArcFace's cross-entropy over per-class cosines [B, C]."""
  m = math.radians(margin)
  cos = jnp.clip(cos, -1.0, 1.0)
  target = jnp.sum(one_hot * cos, axis=-1)
  sine = distances.safe_sqrt(1.0 - target * target)
  plus_margin = jnp.where(target >= math.cos(math.pi - m),
                          target * math.cos(m) - sine * math.sin(m),
                          target - m * math.sin(m))
  logits = cos + one_hot * (plus_margin - target)[:, None]
  return cross_entropy(scale * logits, one_hot)


def arcface(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
            margin: float = 28.6, scale: float = 64.0, ref_embeddings: jax.Array | None = None,
            ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
            ref_self_index: jax.Array | None = None,
            reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """ArcFace (Deng et al. 2019), PML's `ArcFaceLoss`; `margin` in degrees.

  The own class's cosine becomes cos(theta + m), or cos(theta) - m sin(m)
  where theta > pi - m (keeps the logit decreasing in theta); then
  cross-entropy over scale * logits. Computed as c cos m - sqrt(1 - c^2)
  sin m rather than through arccos, the same value with a finite gradient
  at c = +-1. Allocates [B, C].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, _, one_hot = prepare("arcface", embeddings, labels, loss_params,
                                   refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  return _finish("arcface", _arcface_loss(distances.cosine_matrix(x, proxies), one_hot, margin,
                                          scale), reduction, labels)


def _per_class(name, x, proxies, labels, per_class):
  """Cosines to every centre as [B, C, K] (rows c*K + k of the table) and the
  labels' one-hot over the C classes."""
  if proxies.shape[0] % per_class:
    raise ValueError(f"{name}: {proxies.shape[0]} rows of loss_params['proxies'] are not "
                     f"a multiple of {per_class} centres per class.")
  num_classes = proxies.shape[0] // per_class
  cos = distances.cosine_matrix(x, proxies).reshape(x.shape[0], num_classes, per_class)
  return cos, jax.nn.one_hot(labels, num_classes, dtype=x.dtype)


def _init_per_class(draw, key, default):
  def init(rng, *, num_classes, dim, **hparams):
    rows = num_classes * int(hparams.get(key, default))
    return {"proxies": draw(rng, rows, dim)}
  return init


def subcenter_arcface(*, embeddings: jax.Array, labels: jax.Array,
                      loss_params: Mapping[str, jax.Array], margin: float = 28.6,
                      scale: float = 64.0, sub_centers: int = 3,
                      ref_embeddings: jax.Array | None = None, ref_labels: jax.Array | None = None,
                      ref_valid: jax.Array | None = None, ref_self_index: jax.Array | None = None,
                      reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """Sub-center ArcFace (Deng et al. 2020), PML's `SubCenterArcFaceLoss`:
  ArcFace on each class's best-matching of its `sub_centers` centres
  (`loss_params["proxies"]` [C * sub_centers, D], class-major). Allocates
  [B, C * sub_centers].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, labels, _ = prepare("subcenter_arcface", embeddings, labels, loss_params,
                                  refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  cos, one_hot = _per_class("subcenter_arcface", x, proxies, labels, int(sub_centers))
  return _finish("subcenter_arcface", _arcface_loss(jnp.max(cos, axis=-1), one_hot, margin,
                                                    scale), reduction, labels)


def soft_triple(*, embeddings: jax.Array, labels: jax.Array, loss_params: Mapping[str, jax.Array],
                centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1,
                margin: float = 0.01, ref_embeddings: jax.Array | None = None,
                ref_labels: jax.Array | None = None, ref_valid: jax.Array | None = None,
                ref_self_index: jax.Array | None = None,
                reduction: reducers.Reduction = "mean") -> reducers.LossAndAux:
  """SoftTriple (Qian et al. 2019), PML's `SoftTripleLoss`.

  A class's similarity is the softmax(cos / gamma)-weighted mean of its
  centres' cosines; cross-entropy over la * (similarity - margin at the own
  class), averaged. `loss_params["proxies"]` is [C * centers_per_class, D],
  class-major. Allocates [B, C * centers_per_class].

  Shapes: `embeddings` float [B, D], `labels` int [B] in [0, C), `loss_params["proxies"]` float
  (shape above, [C, D] unless said); the loss is a float scalar.
  """
  x, proxies, labels, _ = prepare("soft_triple", embeddings, labels, loss_params,
                                  refs(ref_embeddings, ref_labels, ref_valid, ref_self_index))
  cos, one_hot = _per_class("soft_triple", x, proxies, labels, int(centers_per_class))
  weights = jax.nn.softmax(cos / gamma, axis=-1)
  similarity = jnp.sum(weights * cos, axis=-1)
  return _finish("soft_triple", cross_entropy(la * (similarity - margin * one_hot), one_hot),
                 reduction, labels)


# Sub-center ArcFace: PML's normal_ init; SoftTriple: kaiming_uniform_(a=sqrt(5))
# on PML's [D, C*K] tensor, i.e. U(-1/sqrt(C*K), 1/sqrt(C*K)).
init_subcenter = _init_per_class(
    lambda rng, rows, dim: jax.random.normal(rng, (rows, dim), jnp.float32), "sub_centers", 3)
init_soft_triple = _init_per_class(
    lambda rng, rows, dim: jax.random.uniform(rng, (rows, dim), jnp.float32,
                                              -1 / math.sqrt(rows), 1 / math.sqrt(rows)),
    "centers_per_class", 10)
