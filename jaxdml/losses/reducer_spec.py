"""What `reduction=` may say: PML's reducers by name, checked without JAX.

`parse` turns a name or a dict into `{"name": ..., **params}` and raises
one ValueError naming the problem; `jaxdml.losses.reducers` applies the
result, and `jaxdml.config.validate` checks a config's `loss.reduction`
with it before anything is built.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

# What `reduction=` takes: a reducer's name, or a dict with it under "name".
Reduction = Union[str, Mapping[str, Any]]

NAMES = ("avg_nonzero", "class_weighted", "divisor", "do_nothing", "mean", "multiple",
         "per_anchor", "per_anchor_sum", "sum", "threshold")
_PARAMS = {"class_weighted": ("weights",), "threshold": ("low", "high"),
           "per_anchor": ("reducer",), "multiple": ("reducers", "default")}


def parse(reduction: Reduction) -> dict:
  """`reduction=` as a dict {"name": ..., **params}, checked; ValueError
  naming the problem otherwise."""
  spec = {"name": reduction} if isinstance(reduction, str) else dict(reduction or {})
  name = spec.get("name")
  if name not in NAMES:
    raise ValueError(f"reduction={reduction!r}: unknown reducer {name!r}; use one of {NAMES} "
                     "(a name, or a dict with the name under 'name' and its parameters).")
  extra = sorted(set(spec) - {"name"} - set(_PARAMS.get(name, ())))
  if extra:
    raise ValueError(f"reduction={reduction!r}: {name!r} takes no {extra}; it takes "
                     f"{list(_PARAMS.get(name, ()))}.")
  if name == "threshold" and spec.get("low") is None and spec.get("high") is None:
    raise ValueError(f"reduction={reduction!r}: a threshold reducer needs 'low' or 'high'.")
  if name == "class_weighted" and spec.get("weights") is None:
    raise ValueError(f"reduction={reduction!r}: class_weighted needs 'weights', one per class.")
  if name == "per_anchor":
    spec["reducer"] = parse(spec.get("reducer") or "mean")
  if name == "multiple":
    spec["reducers"] = {k: parse(v) for k, v in dict(spec.get("reducers") or {}).items()}
    spec["default"] = parse(spec.get("default") or "mean")
  return spec
