"""PML's regularizers as weighted terms attachable to any loss.

Every registered loss takes, through the registry (`jaxdml.losses.get`):

    embedding_regularizer={"name": "lp", "p": 2, "power": 1}, embedding_reg_weight=1.0

and the losses with learnable class vectors (`loss_params["proxies"]`:
proxy_anchor, proxy_nca, normalized_softmax, cosface, arcface,
subcenter_arcface, soft_triple, large_margin_softmax, sphereface) also

    weight_regularizer={"name": "regular_face"}, weight_reg_weight=1.0

The loss value becomes `loss + weight * regularizer(x)` with `x` the raw
embeddings [B, D] or the class vectors [C, D], exactly PML's
`embedding_reg_loss` / `weight_reg_loss` sub-losses (already reduced, so
the loss's reducer adds them as they are); aux gains `embedding_reg_loss`
/ `weight_reg_loss` (weighted).

Regularizers (PML's class; its per-row losses, reduced by its own reducer,
`"reduction"` in the dict, any of jaxdml.losses.reducers; PML's default):
- "lp" (LpRegularizer(p=2, power=1)): ||x_i||_p ** power; mean.
- "zero_mean" (ZeroMeanRegularizer): |sum_d x_id|; mean.
- "center_invariant" (CenterInvariantRegularizer): (|x_i|^2 - mean_j
  |x_j|^2)^2 / 4; mean.
- "regular_face" (RegularFaceRegularizer): each row's largest cosine to
  another row; mean.
- "sparse_centers" (SparseCentersRegularizer(num_classes,
  centers_per_class)): sqrt(2 - 2 cos) over pairs of centres of one class,
  summed and divided by twice the number of such pairs (DivisorReducer).
Their distances are PML's defaults (cosine for the last two, the L2 norm
for center_invariant), the only ones PML accepts for three of the five.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdml.losses import distances
from jaxdml.losses import reducers

# name -> (its hyperparameters and their PML defaults, its default reducer)
REGULARIZERS = {
    "lp": ({"p": 2.0, "power": 1.0}, "mean"),
    "zero_mean": ({}, "mean"),
    "center_invariant": ({}, "mean"),
    "regular_face": ({}, "mean"),
    "sparse_centers": ({"num_classes": None, "centers_per_class": None}, "divisor"),
}


def parse(spec: str | Mapping[str, Any], what: str = "embedding_regularizer") -> dict:
  """The regularizer dict with its defaults filled in; ValueError naming the
  problem otherwise."""
  spec = {"name": spec} if isinstance(spec, str) else dict(spec)
  name = spec.pop("name", None)
  if name not in REGULARIZERS:
    raise ValueError(f"{what}={spec!r}: unknown regularizer {name!r}; use one of "
                     f"{tuple(REGULARIZERS)} as {{'name': ..., **its hyperparameters}}.")
  defaults, reduction = REGULARIZERS[name]
  unknown = sorted(set(spec) - set(defaults) - {"reduction"})
  if unknown:
    raise ValueError(f"{what}: regularizer {name!r} takes no {unknown}; it takes "
                     f"{sorted(defaults) + ['reduction']}.")
  out = {"name": name, "reduction": spec.pop("reduction", reduction), **defaults, **spec}
  missing = [k for k, v in out.items() if v is None]
  if missing:
    raise ValueError(f"{what}: regularizer {name!r} needs {missing}.")
  if name == "sparse_centers" and int(out["centers_per_class"]) < 2:
    raise ValueError(f"{what}: sparse_centers needs centers_per_class > 1 (PML asserts it).")
  if reducers.parse(out["reduction"])["name"] == "do_nothing":
    raise ValueError(f"{what}: a regularizer's value is added to the loss, so its reduction "
                     "cannot be 'do_nothing'.")
  return out


def _lp(x, p, power):
  if p == 2:
    norm = distances.safe_norm(x)
  else:
    norm = distances.safe_pow(jnp.sum(jnp.abs(x) ** p, axis=-1), 1.0 / p)
  return norm if power == 1 else distances.safe_pow(norm, power)


def _same_class_pairs(num_classes, centers_per_class):
  """PML's same_class_mask: (i, j), i < j, centres of one class."""
  block = np.triu(np.ones((centers_per_class, centers_per_class), bool), 1)
  return np.kron(np.eye(num_classes, dtype=bool), block)


def terms(spec: dict, x: jax.Array) -> reducers.Term:
  """The regularizer's per-element losses on rows `x` [N, D], as PML lists them.

  Float rows; the losses float [N].
  """
  x = distances.as_float(x)
  name = spec["name"]
  if name == "lp":
    return reducers.Term(_lp(x, spec["p"], spec["power"]), "element")
  if name == "zero_mean":
    return reducers.Term(jnp.abs(jnp.sum(x, axis=1)), "element")
  if name == "center_invariant":
    sq = distances.safe_norm(x) ** 2
    return reducers.Term((sq - jnp.mean(sq)) ** 2 / 4, "element")
  cos = distances.cosine_matrix(x, x)
  if name == "regular_face":
    # The nearest other row is chosen without gradient, as PML's no_grad mask.
    others = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, jax.lax.stop_gradient(cos))
    nearest = jnp.argmax(others, axis=1)
    return reducers.Term(jnp.take_along_axis(cos, nearest[:, None], axis=1)[:, 0], "element")
  num_classes, per_class = int(spec["num_classes"]), int(spec["centers_per_class"])
  if x.shape[0] != num_classes * per_class:
    raise ValueError(f"sparse_centers: {x.shape[0]} rows are not num_classes={num_classes} x "
                     f"centers_per_class={per_class}.")
  same = _same_class_pairs(num_classes, per_class)
  tiny = jnp.finfo(x.dtype).tiny
  # Only the listed pairs: a row's cosine with itself would put sqrt's infinite slope at 0.
  reg = distances.safe_sqrt(jnp.where(same, 2.0 + tiny - jnp.minimum(2.0 * cos, 2.0), 1.0))
  return reducers.Term(reg, "element", mask=jnp.asarray(same),
                       divisor=2.0 * float(same.sum()))


def value(spec: str | Mapping[str, Any], x: jax.Array,
          what: str = "embedding_regularizer") -> jax.Array:
  """The regularizer's value on rows `x`, reduced by its reducer.

  `x` float [N, D]; the result a float scalar.
  """
  spec = parse(spec, what)
  term = terms(spec, x)
  rows = jnp.arange(x.shape[0])  # PML hands the regularizer's reducer arange(N) as labels
  loss, _ = reducers.finish({"loss": term}, spec["reduction"], labels=rows, loss_name=spec["name"])
  return loss
