"""Pure, jit- and grad-safe metric-learning losses behind one call contract.

  fn = jaxdml.losses.get("triplet")
  loss, aux = fn(embeddings=E, labels=y, ref_embeddings=None, ref_labels=None,
                 ref_valid=None, **hparams)

Every loss takes keyword arguments only, so a misspelt hyperparameter raises
TypeError. `loss` is a scalar, `aux` a dict of scalar arrays for logging.
No Python control flow depends on array values.

Pairs and the reference set (ranking losses: triplet, relative_triplet,
contrastive, contrastive_koleo, multi_similarity, and the others registered
with consumes "reference_set", e.g. angular, nca, intra_pair_variance):
- Without `ref_embeddings`, pairs are formed within the batch, never an
  anchor with itself (PML's default).
- With `ref_embeddings` [R, D] and `ref_labels` [R], pairs are formed between
  `embeddings` (anchors) and the reference set *only*, exactly as PML's
  `ref_emb` / `ref_labels`. `ref_valid` (bool [R]) masks empty memory slots:
  what they hold changes nothing.
- Recipes that also want in-batch pairs (XBM, XBN) put the batch inside the
  reference set (e.g. concatenated with the memory) and pass
  `ref_self_index` (int [B]): for anchor i, the index of its own copy in the
  reference set, or -1; that entry is dropped from anchor i's positives and
  negatives. With ref = batch and ref_self_index = arange(B) every loss
  equals its in-batch value.
The distillation/regulariser losses (koleo, embedding_distill, raml, obd_sd)
accept the same arguments, ignore `labels`, and raise ValueError when given a
reference set. The unsupervised losses take no labels (`labels=None`,
ignored if given): manifold (learnable proxies, a random assignment to them
from `rng=`) and vicreg, whose `ref_embeddings` is the second view of the
batch (row i the same image), passed by the caller, not a memory.

The registry records what each loss consumes beyond embeddings and labels
(`consumes(name)`, keys of `INPUTS`): the teacher's outputs, the training
progress, a reference set, learnable parameters, running state, a random
key. The train step offers what it has and `inputs_for(name, available)`
picks the loss's keywords, so
`register("my_distill", fn, consumes=("teacher",))` from outside the
package is enough for a new distillation term.

Running state (PML's buffers, e.g. DynamicSoftMargin's histogram): a loss
that consumes "state" is registered with `init_state(**hparams) -> pytree`
(`init_state(name, **hparams)` makes it), is called with `loss_state=` and
returns a 3-tuple `(loss, aux, new_state)`; the caller passes `new_state`
to the next call (the train state carries it beside the cross-batch
memory). The state is not trained: `new_state` comes back under
stop_gradient. A loss that draws random numbers consumes "rng" and is
given a fresh key as `rng=` on every call.

Distances (`distance=`, jaxdml.losses.distances) are PML's: "euclidean" is
`LpDistance()`, which L2-normalises the rows first, "cosine"
`CosineSimilarity()`; a loss called with no hyperparameters computes what
PML's class of the same name computes with no arguments, value and
gradient, on raw embeddings (smooth_ap: the authors' code, which PML's
equals only with as many classes as samples per class in the batch). Embeddings that must stay as they are
(BatchNorm-ended towers) say `distance=dict(name="euclidean",
normalize_embeddings=False)`. Distances use a safe sqrt: no NaN gradient at
distance 0.

Reductions (`reduction=`, jaxdml.losses.reducers) are PML's reducers with
PML's meanings. Each loss lists its per-element losses as PML's loss dict
does (named sub-losses of kind element, pos_pair, neg_pair or triplet) and
one reduce step applies the reducer to every sub-loss and sums them:
"avg_nonzero", "mean", "sum", "divisor", "do_nothing" (the value is then
PML's dict of per-element losses), {"name": "class_weighted", "weights"},
{"name": "threshold", "low", "high"}, {"name": "per_anchor", "reducer"},
{"name": "multiple", "reducers": {sub_loss: ...}, "default"}. The default
is each loss's PML default (AvgNonZeroReducer for triplet, contrastive,
supcon, circle; DivisorReducer for proxy_anchor and margin; MeanReducer
otherwise), so values compare directly. The losses PML computes already
reduced (histogram, pnp, threshold_consistent_margin, p2s_grad, manifold,
dynamic_soft_margin) take only their default: PML's reducers leave such a
loss as it is, so another reduction is a ValueError saying so. contrastive
(and any pair loss) also takes "per_anchor_sum", XBM's code and IRT's
equation (each anchor's pair losses summed, the sums averaged), which the
XBM/XBN and IRT recipes use. relative_triplet, koleo, embedding_distill,
raml and obd_sd are not PML's and keep their own reductions.

Regularizers (jaxdml.losses.regularizers): every loss `get` returns also
takes `embedding_regularizer={"name": "lp" | "zero_mean" |
"center_invariant" | "regular_face", ...}` and `embedding_reg_weight=`,
and the losses with class vectors (WEIGHT_REGULARIZED) `weight_regularizer=`
(those and "sparse_centers") and `weight_reg_weight=`: PML's regularizers,
each reduced by its own reducer, added to the loss as PML's already-reduced
sub-losses; aux gets `embedding_reg_loss` / `weight_reg_loss`.
`distances.batched` computes a distance matrix a block of reference rows at
a time for large reference sets.

Registered names: triplet, relative_triplet, contrastive, contrastive_koleo,
multi_similarity, ntxent, supcon, circle, tuplet_margin, lifted_structure,
generalized_lifted_structure, margin, npairs, fast_ap, smooth_ap, koleo, embedding_distill,
raml, obd_sd, snr_contrastive, angular, nca, ranked_list, instance
(jaxdml.losses.listwise), histogram, pnp, intra_pair_variance,
threshold_consistent_margin (jaxdml.losses.similarity_distributions), and
the losses with learnable class vectors (`loss_params["proxies"]`, made by
`init_params`): proxy_anchor, proxy_nca, normalized_softmax, cosface,
arcface, subcenter_arcface, soft_triple (jaxdml.losses.proxies),
large_margin_softmax, sphereface, p2s_grad (jaxdml.losses.margin_softmax); the
unsupervised manifold (K learnable proxies) and vicreg (two views); and the
stateful dynamic_soft_margin.
See each function's docstring for its hyperparameters and the choices that
are ours.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # annotations only: the registry loads without JAX
  import jax

# Submodules load when first used (`losses.get`, `jaxdml.losses.triplet`):
# the registry itself is plain data, so a config is checked without JAX.
_SUBMODULES = ("average_precision", "contrastive", "distances", "distill",
               "dynamic_soft_margin", "koleo", "lifted", "listwise", "manifold", "margin",
               "margin_softmax", "miners", "multi_similarity", "obd_sd", "pairs", "proxies",
               "reducer_spec", "reducers", "regularizers", "relative_triplet",
               "similarity_distributions", "softmax_pairs", "triplet", "vicreg", "wrappers")
# Loss wrappers (`jaxdml.losses.wrappers`): PML's SelfSupervisedLoss and MultipleLosses.
_WRAPPERS = ("self_supervised", "multiple")

# What a loss consumes beyond `embeddings` and `labels`, and the keyword the
# train step passes it under (None: the caller passes the reference set).
INPUTS = {
    "teacher": "teacher_embeddings",  # the teacher's outputs on the same batch
    "progress": "progress",  # training progress in [0, 1] (jaxdml.objective.progress)
    "reference_set": None,  # ref_embeddings, ref_labels, ref_valid, ref_self_index
    "params": "loss_params",  # the loss's learnable parameters (init_params), trained
    "state": "loss_state",  # the loss's running state (init_state); it returns the next
    "rng": "rng",  # a fresh jax.random key for this call
}


def _load(target):
  """A function, or the function a "module:attr" string names (imported now)."""
  if not isinstance(target, str):
    return target
  module, _, attr = target.partition(":")
  return getattr(importlib.import_module(f"jaxdml.losses.{module}"), attr)


@dataclasses.dataclass(frozen=True)
class Registered:
  target: Callable | str  # the loss, or "module:function" of jaxdml.losses
  consumes: frozenset
  init_params: Callable | str | None = None
  params_when: Callable | None = None  # hparams -> whether they ask for parameters
  init_state: Callable | None = None

  @property
  def fn(self) -> Callable:
    # Run as on an Auto mesh when the arrays' mesh has Explicit axes.
    """The registered loss (a "module:function" target imported now), wrapped to run on any
    mesh."""
    from jaxdml import sharding  # pylint: disable=g-import-not-at-top
    return sharding.on_any_mesh(_load(self.target))


_REGISTRY: dict[str, Registered] = {}


def names() -> tuple[str, ...]:
  """Sorted names of the registered losses."""
  return tuple(sorted(_REGISTRY))


def _entry(name) -> Registered:
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown loss {name!r}; registered losses: {', '.join(names())}."
    ) from None


def check_name(name: str) -> None:
  """ValueError naming the registered losses unless `name` is one."""
  _entry(name)


# PML's losses with a WeightRegularizerMixin: their class vectors take a weight_regularizer.
WEIGHT_REGULARIZED = frozenset(("proxy_anchor", "proxy_nca", "normalized_softmax", "cosface",
                                "arcface", "subcenter_arcface", "soft_triple",
                                "large_margin_softmax", "sphereface"))


def get(name: str) -> Callable[..., Any]:
  """The loss function registered under `name`; ValueError if unknown.

  It takes the loss's own keywords plus `embedding_regularizer=`,
  `embedding_reg_weight=` (and, for WEIGHT_REGULARIZED losses,
  `weight_regularizer=`, `weight_reg_weight=`): PML's regularizers added as
  weighted terms (jaxdml.losses.regularizers).
  """
  entry = _entry(name)
  key = (name, entry.target)  # a loss registered again under the name is a new key
  if key not in _WRAPPED:  # one function per loss, so jax.jit's cache keeps hitting
    _WRAPPED[key] = _with_regularizers(name, entry.fn)
  return _WRAPPED[key]


_WRAPPED: dict = {}


def _with_regularizers(name, fn):
  import functools  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  weights = name in WEIGHT_REGULARIZED

  @functools.wraps(fn)
  def loss(*, embedding_regularizer=None, embedding_reg_weight=1.0, **kwargs):
    weight_regularizer = kwargs.pop("weight_regularizer", None) if weights else None
    weight_reg_weight = kwargs.pop("weight_reg_weight", 1.0) if weights else 1.0
    out = fn(**kwargs)
    if embedding_regularizer is None and weight_regularizer is None:
      return out
    regs = _load("regularizers:value")
    value, aux, *state = out
    aux, added = dict(aux), {}
    if embedding_regularizer is not None:
      added["embedding_reg_loss"] = embedding_reg_weight * regs(
          embedding_regularizer, kwargs["embeddings"])
    if weight_regularizer is not None:
      added["weight_reg_loss"] = weight_reg_weight * regs(
          weight_regularizer, kwargs["loss_params"]["proxies"], "weight_regularizer")
    aux.update(added)
    if isinstance(value, dict):  # "do_nothing": PML's dict gains already-reduced entries
      value = {**value, **{k: {"losses": v, "mask": None, "reduction_type": "already_reduced"}
                           for k, v in added.items()}}
    else:
      value = value + sum(added.values())
    return (value, aux, *state)

  params = list(inspect.signature(fn).parameters.values())
  extra = ["embedding_regularizer", "embedding_reg_weight"]
  if weights:
    extra += ["weight_regularizer", "weight_reg_weight"]
  var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
  params = [p for p in params
            if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in extra]
  params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY,
                               default=1.0 if k.endswith("weight") else None) for k in extra]
  loss.__signature__ = inspect.Signature(params + var_kw)
  return loss


def make(name: str, *, with_aux: bool = True, **hparams: Any) -> Callable:
  """The loss `name` with its hyperparameters bound: a function of arrays
  only, so `jax.jit`, `jax.grad` and `jax.vmap` take it as it is (PML's
  `TripletMarginLoss(margin=0.1)` is `make("triplet", margin=0.1)`).

      loss_fn = jax.jit(losses.make("triplet", margin=0.1, distance="cosine"))
      loss, aux = loss_fn(embeddings=E, labels=y)
      grads = jax.grad(losses.make("triplet", with_aux=False))(E, labels=y)

  A misspelt hyperparameter is a TypeError here, not at the first call. A
  `distance` is resolved to its `Distance` value once. With
  `with_aux=False` it returns the scalar loss alone and takes the
  embeddings as its first positional argument, what `jax.grad` wants
  (with the `(loss, aux)` form, use `jax.grad(..., has_aux=True)`).
  """
  import functools  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  fn = get(name)
  params = inspect.signature(fn).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  unknown = sorted(k for k in hparams if k not in params and not takes_any)
  if unknown:
    raise TypeError(f"loss {name!r} takes no hyperparameter(s) {unknown}; it takes "
                    f"{sorted(k for k in params if k not in ('embeddings', 'labels'))}.")
  if "distance" in hparams:
    hparams["distance"] = _load("distances:resolve")(hparams["distance"])
  bound = functools.partial(fn, **hparams)
  if with_aux:
    return bound

  def value(embeddings, **arrays):
    return bound(embeddings=embeddings, **arrays)[0]
  value.__name__ = f"{name}_value"
  return value


def consumes(name: str, hparams: Mapping[str, Any] | None = None) -> frozenset:
  """What the loss `name` takes beyond embeddings and labels (keys of INPUTS);
  with `hparams`, for that setting (margin takes parameters only with
  learn_beta=True)."""
  entry = _entry(name)
  if hparams is not None and entry.params_when and not entry.params_when(hparams):
    return entry.consumes - {"params"}
  return entry.consumes


def inputs_for(name: str, available: dict, hparams: Mapping[str, Any] | None = None) -> dict:
  """The keywords of `available` (INPUTS key -> value) that loss `name` consumes.

  The train step offers every input it has; a consumed input that is None
  (no teacher in the config) is an error that says what to configure.
  """
  kwargs = {}
  for need in sorted(consumes(name, hparams)):
    keyword = INPUTS[need]
    if keyword is None:
      continue
    if available.get(need) is None:
      raise ValueError(f"loss {name!r} consumes {need!r}, which this config does not "
                       f"provide" + (": set config.teacher (see jaxdml.teacher)."
                                     if need == "teacher" else "."))
    kwargs[keyword] = available[need]
  return kwargs


def init_params(name: str, rng: jax.Array, *, num_classes: int, dim: int, **hparams: Any) -> Any:
  """The learnable parameters of loss `name` (a pytree) for `num_classes`
  classes of `dim`-wide embeddings; `hparams` are the loss's own.

  `rng`: a jax.random key. The pytree holds float32 arrays, e.g. `{"proxies": [num_classes,
  dim]}`.
  """
  entry = _entry(name)
  if entry.init_params is None:
    raise ValueError(f"loss {name!r} has no learnable parameters.")
  return _load(entry.init_params)(rng, num_classes=int(num_classes), dim=int(dim), **hparams)


def init_state(name: str, **hparams: Any) -> Any:
  """The initial running state of loss `name` (a pytree) for its `hparams`;
  the loss returns the next one as the third element of its result."""
  entry = _entry(name)
  if entry.init_state is None:
    raise ValueError(f"loss {name!r} keeps no running state.")
  return _load(entry.init_state)(**hparams)


def register(name: str, fn: Callable[..., Any] | str, *,  # pylint: disable=redefined-outer-name
             consumes: Sequence[str] = ("reference_set",),
             init_params: Callable[..., Any] | str | None = None,
             params_when: Callable[[Mapping[str, Any]], bool] | None = None,
             init_state: Callable[..., Any] | str | None = None) -> None:
  """Adds `fn` under `name`; `consumes` lists the keys of INPUTS it takes.

  A distillation loss says `consumes=("teacher",)` and is given
  `teacher_embeddings=`; a ranking loss that accepts `ref_*` arguments (and
  so can work against the cross-batch memory) says "reference_set". A loss
  with learnable parameters says "params" and gives `init_params(rng, *,
  num_classes, dim, **hparams) -> pytree`: the train state keeps them (under
  `loss_params`, by term) and the optimizer trains them with the encoder.
  `params_when(hparams) -> bool` says which settings have parameters, when
  not all do. A loss with running state says "state" and gives
  `init_state(**hparams) -> pytree`; it is called with `loss_state=` and
  returns `(loss, aux, new_state)`. `fn`, `init_params` and `init_state`
  may be a "module:function" string of a jaxdml.losses submodule, imported
  when first used.
  Re-registering a taken name is a ValueError.
  """
  if not (callable(fn) or isinstance(fn, str)):
    raise ValueError(f"register({name!r}, ...): fn must be callable.")
  if name in _REGISTRY:
    raise ValueError(
        f"A loss named {name!r} is already registered; pick another name.")
  unknown = set(consumes) - set(INPUTS)
  if unknown:
    raise ValueError(f"register({name!r}, ...): consumes {sorted(unknown)} unknown; "
                     f"expected a subset of {sorted(INPUTS)}.")
  if ("params" in consumes) != (init_params is not None):
    raise ValueError(f"register({name!r}, ...): a loss that consumes 'params' gives "
                     "init_params, and only such a loss.")
  if ("state" in consumes) != (init_state is not None):
    raise ValueError(f"register({name!r}, ...): a loss that consumes 'state' gives "
                     "init_state, and only such a loss.")
  _REGISTRY[name] = Registered(fn, frozenset(consumes), init_params, params_when, init_state)


for _name, _fn in (("triplet", "triplet:triplet"),
                   ("relative_triplet", "relative_triplet:relative_triplet"),
                   ("contrastive", "contrastive:contrastive"),
                   ("contrastive_koleo", "koleo:contrastive_koleo"),
                   ("multi_similarity", "multi_similarity:multi_similarity"),
                   ("ntxent", "softmax_pairs:ntxent"), ("supcon", "softmax_pairs:supcon"),
                   ("circle", "softmax_pairs:circle"),
                   ("tuplet_margin", "softmax_pairs:tuplet_margin"),
                   ("generalized_lifted_structure", "lifted:generalized_lifted_structure"),
                   ("snr_contrastive", "contrastive:snr_contrastive"),
                   ("angular", "listwise:angular"), ("nca", "listwise:nca"),
                   ("intra_pair_variance", "similarity_distributions:intra_pair_variance"),
                   ("threshold_consistent_margin",
                    "similarity_distributions:threshold_consistent_margin")):
  register(_name, _fn)
register("margin", "margin:margin", consumes=("reference_set", "params"),
         init_params="margin:init_beta", params_when=lambda hp: bool(hp.get("learn_beta")))
for _name, _init in (("proxy_anchor", "init_kaiming_fan_out"), ("proxy_nca", "init_normal"),
                     ("normalized_softmax", "init_normal"), ("cosface", "init_normal"),
                     ("arcface", "init_normal"), ("subcenter_arcface", "init_subcenter"),
                     ("soft_triple", "init_soft_triple")):
  register(_name, f"proxies:{_name}", consumes=("params",), init_params=f"proxies:{_init}")
for _name, _init in (("large_margin_softmax", "proxies:init_normal"),
                     ("sphereface", "proxies:init_normal"),
                     ("p2s_grad", "margin_softmax:init_p2s_grad")):
  register(_name, f"margin_softmax:{_name}", consumes=("params",), init_params=_init)
register("manifold", "manifold:manifold", consumes=("params", "rng"),
         init_params="manifold:init_manifold")  # no labels; K proxies
register("vicreg", "vicreg:vicreg", consumes=())  # two views, no labels: the caller's
register("dynamic_soft_margin", "dynamic_soft_margin:dynamic_soft_margin",
         consumes=("reference_set", "state"), init_state="dynamic_soft_margin:init_state")
register("koleo", "koleo:koleo", consumes=())
register("lifted_structure", "lifted:lifted_structure", consumes=())  # in-batch only
register("npairs", "margin:npairs", consumes=())  # in-batch only
register("fast_ap", "average_precision:fast_ap", consumes=())  # in-batch only
register("smooth_ap", "average_precision:smooth_ap", consumes=())  # in-batch only
for _name, _fn in (("ranked_list", "listwise:ranked_list"), ("instance", "listwise:instance"),
                   ("histogram", "similarity_distributions:histogram"),
                   ("pnp", "similarity_distributions:pnp")):
  register(_name, _fn, consumes=())  # in-batch only, as in PML
register("embedding_distill", "distill:embedding_distill", consumes=("teacher",))
register("raml", "distill:raml", consumes=("teacher",))
register("obd_sd", "obd_sd:obd_sd", consumes=("teacher", "progress"))


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxdml.losses.{name}")
  if name in _WRAPPERS:
    return getattr(importlib.import_module("jaxdml.losses.wrappers"), name)
  raise AttributeError(f"module 'jaxdml.losses' has no attribute {name!r}")
