"""Optimizers and learning-rate schedules from `config.optimizer`.

Fields: `name` ('adamw' | 'adam' | 'sgd'), `lr`, `weight_decay`, `b1`, `b2`,
`momentum` (sgd), `schedule` ('constant' | 'warmup_cosine' | 'one_cycle' |
'step': times `decay_rate` every `decay_steps`, Proxy-Anchor's StepLR),
`warmup_steps`, `end_lr_factor`, `grad_clip_norm` (None: off),
`lr_multipliers` (regex of state paths -> factor on the learning rate, e.g.
`{"loss_params": 100.0}`, a regex searched in each path: proxies train
100x faster, as Proxy-Anchor's; identifier keys stay overridable from the
command line),
`no_decay` (regex of parameter paths excluded from weight decay, on top of
every 1-d parameter: biases and norm scales), `accumulate_steps` (gradient
accumulation, RAML's 25 batches), `frozen` (regex of parameters kept fixed),
`warm_steps` / `warm_trains` (for the first `warm_steps` updates only the
parameters whose path matches `warm_trains` train, by default the embedding
head and the losses' parameters; the rest, and their optimizer state, stay
as they are: Proxy-Anchor's `--warm`, PyTorch's requires_grad=False).

'adam' follows PyTorch's `Adam(weight_decay=...)`: decay is added to the
gradient before the moments (L2 regularisation), as the XBM and OBD-SD
reference code uses it; 'adamw' decouples it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdml import config as config_lib
from jaxdml.config import defaults


def settings(cfg) -> dict:
  """`cfg` completed from `jaxdml.config.defaults.OPTIMIZER` (a resolved
  config is complete already; a partial one from a user's code is not); an
  unknown field is an error naming the known ones."""
  given = config_lib.as_dict(cfg)
  config_lib.check_fields("config.optimizer", given, defaults.OPTIMIZER)
  merged = {**defaults.OPTIMIZER, **given}
  if merged["lr"] is None:
    raise ValueError("config.optimizer.lr is not set.")
  return merged


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  cfg = settings(cfg)
  kind = cfg["schedule"]
  lr = float(cfg["lr"])
  warmup = int(cfg["warmup_steps"])
  end = lr * float(cfg["end_lr_factor"])
  if kind == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
          [warmup])
    return optax.constant_schedule(lr)
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=end)
  if kind == "step":
    if int(cfg["decay_steps"]) <= 0:
      raise ValueError("config.optimizer.schedule='step' needs decay_steps > 0.")
    decay = optax.exponential_decay(lr, int(cfg["decay_steps"]), float(cfg["decay_rate"]),
                                    staircase=True)
    if warmup:
      return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    return decay
  if kind == "one_cycle":
    # RAML trains with PyTorch's OneCycleLR (default pct_start 0.3, the
    # starting lr peak / div_factor, 25 by default, 10 in RAML's code).
    return optax.cosine_onecycle_schedule(
        transition_steps=total_steps, peak_value=lr,
        pct_start=float(cfg["pct_start"]), div_factor=float(cfg["div_factor"]))
  raise ValueError(
      f"config.optimizer.schedule={kind!r}: expected 'constant', "
      "'warmup_cosine', 'one_cycle' or 'step'.")


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _mask(params, predicate):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: predicate(_path_name(p), x), params)


def decay_mask_fn(no_decay_regex: str | None):
  """True where weight decay applies: matrices, not biases/norms/tokens."""
  pattern = re.compile(no_decay_regex) if no_decay_regex else None
  def fn(params):
    return _mask(params, lambda name, x: x.ndim > 1 and not (
        pattern and pattern.search(name)))
  return fn


def _update_rule(cfg, schedule) -> list:
  """adamw / adam / sgd with weight decay at `schedule`, as a list of
  transforms (spliced into the outer chain, so the state layout of
  checkpoints is that of one flat chain)."""
  name, wd = cfg["name"], float(cfg["weight_decay"])
  mask = decay_mask_fn(cfg["no_decay"])
  if name == "adamw":
    return [optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], weight_decay=wd, mask=mask)]
  chain = [optax.add_decayed_weights(wd, mask=mask)] if wd else []
  if name == "adam":
    return chain + [optax.adam(schedule, b1=cfg["b1"], b2=cfg["b2"])]
  if name == "sgd":
    return chain + [optax.sgd(schedule, momentum=cfg["momentum"], nesterov=True)]
  raise ValueError(f"config.optimizer.name={name!r}: expected 'adamw', 'adam' or 'sgd'.")


class HeldState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def held_for(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
  """`tx`, except that its first `steps` updates are zero and leave its
  state as it was: a parameter that is not trained yet neither moves nor
  collects moments or weight decay, and starts like a fresh one."""
  def init(params):
    return HeldState(jnp.zeros((), jnp.int32), tx.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = tx.update(updates, state.inner, params)
    held = state.count < steps
    keep = lambda old, new: jnp.where(held, old, new)
    new_updates = jax.tree.map(lambda u: jnp.where(held, jnp.zeros_like(u), u), new_updates)
    return new_updates, HeldState(jnp.minimum(state.count + 1, steps),
                                  jax.tree.map(keep, state.inner, new_inner))
  return optax.GradientTransformation(init, update)


def make_optimizer(cfg, total_steps: int):
  """Returns `(optax.GradientTransformation, schedule)`.

  `total_steps` counts train steps (batches). With `accumulate_steps` k the
  parameters change every k steps, so the schedule (and `warmup_steps`)
  runs in updates, total_steps // k of them; the returned schedule still
  takes the train step, for logging.
  """
  cfg = settings(cfg)
  accumulate = int(cfg["accumulate_steps"])
  per_update = make_schedule(cfg, max(1, total_steps // max(accumulate, 1)))
  schedule = per_update if accumulate <= 1 else (lambda step: per_update(step // accumulate))
  chain = []
  if cfg["grad_clip_norm"]:
    chain.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
  multipliers = dict(cfg["lr_multipliers"] or {})
  if multipliers:
    # One copy of the update rule per learning rate, chosen by state path;
    # clipping stays global, before the split.
    patterns = [(re.compile(r), float(f)) for r, f in multipliers.items()]
    group = lambda name: next((f"x{i}" for i, (p, _) in enumerate(patterns)
                               if p.search(name)), "base")
    rule = [optax.multi_transform(
        {"base": optax.chain(*_update_rule(cfg, per_update)),
         **{f"x{i}": optax.chain(*_update_rule(cfg, lambda s, f=f: f * per_update(s)))
            for i, (_, f) in enumerate(patterns)}},
        lambda params: _mask(params, lambda name, _: group(name)))]
  else:
    rule = _update_rule(cfg, per_update)
  if int(cfg["warm_steps"]) > 0:
    warm = re.compile(cfg["warm_trains"])
    rule = [optax.multi_transform(
        {"warm": optax.chain(*rule), "held": held_for(optax.chain(*rule), int(cfg["warm_steps"]))},
        lambda params: _mask(params, lambda name, _: "warm" if warm.search(name) else "held"))]
  tx = optax.chain(*chain, *rule)
  if cfg["frozen"]:
    frozen = re.compile(cfg["frozen"])
    labels = lambda params: _mask(
        params, lambda name, _: "frozen" if frozen.search(name) else "train")
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx, schedule
