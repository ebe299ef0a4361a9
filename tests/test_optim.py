"""Optimizer plumbing: gradient accumulation and its schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdml import optim


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(name="adamw", lr=1.0, weight_decay=0.0,
                                        schedule="one_cycle", **kw))


def test_accumulated_schedule_runs_in_updates_not_batches():
  _, plain = optim.make_optimizer(_cfg(), 10)
  _, accumulated = optim.make_optimizer(_cfg(accumulate_steps=3), 30)
  for step in range(30):
    np.testing.assert_allclose(accumulated(step), plain(step // 3), rtol=1e-6)
  # One-cycle peaks 30 % of the way through the updates.
  assert int(np.argmax([accumulated(s) for s in range(30)])) == 9


def test_one_cycle_starts_at_peak_over_div_factor():
  for div_factor, expected in ((None, 1.0 / 25), (10.0, 1.0 / 10)):
    extra = {} if div_factor is None else {"div_factor": div_factor}
    _, schedule = optim.make_optimizer(_cfg(**extra), 100)
    np.testing.assert_allclose(schedule(0), expected, rtol=1e-6)
    np.testing.assert_allclose(schedule(30), 1.0, rtol=1e-6)


def test_accumulating_k_batches_equals_one_step_on_their_mean_gradient():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  grads = [{"w": jnp.array(g)} for g in ([1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [2.0, 1.0, 0.0])]
  cfg = dict(name="sgd", lr=0.1, weight_decay=0.0, schedule="constant", momentum=0.0)
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(cfg, accumulate_steps=3)), 3)
  state, p = tx.init(params), params
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    if i < 2:
      np.testing.assert_array_equal(p["w"], params["w"])  # nothing moves mid-accumulation
  big, _ = optim.make_optimizer(ml_collections.ConfigDict(cfg), 1)
  mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  updates, _ = big.update(mean, big.init(params), params)
  np.testing.assert_allclose(p["w"], optax.apply_updates(params, updates)["w"], rtol=1e-6)


def test_lr_multipliers_scale_the_step_of_the_matching_paths():
  """Adam's first step moves every entry by exactly lr (times its factor)."""
  cfg = ml_collections.ConfigDict(dict(name="adam", lr=1e-3, lr_multipliers={"loss_params": 100.0}))
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"params": {"w": jnp.ones((3, 2))}, "loss_params": {"proxies": jnp.ones((4, 2))}}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["params"]["w"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["loss_params"]["proxies"], -0.1, rtol=1e-4)


def test_the_optimizer_state_layout_is_unchanged_without_multipliers():
  """Checkpoints of existing runs restore: Adam with L2 decay stays one flat chain."""
  cfg = ml_collections.ConfigDict(dict(name="adam", lr=1e-3, weight_decay=4e-4,
                                       grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(cfg, 10)
  state = tx.init({"w": jnp.ones(2)})
  assert isinstance(state, tuple) and len(state) == 3  # clip, decay, adam


def test_step_schedule_decays_every_decay_steps():
  _, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", lr=1.0, schedule="step", decay_steps=10, decay_rate=0.25)), 100)
  np.testing.assert_allclose([schedule(s) for s in (0, 9, 10, 25)], [1, 1, 0.25, 0.0625])


def test_warm_steps_train_only_the_head_and_proxies_first():
  """Proxy-Anchor's --warm: the backbone neither moves nor collects Adam
  moments during the warm-up, then starts like a fresh parameter (its first
  AdamW step is exactly lr), while the head and the proxies train from step 0."""
  params = {"params": {"backbone": {"kernel": jnp.ones((3, 2))},
                       "embed_head": {"proj": {"kernel": jnp.ones((2, 2))}}},
            "loss_params": {"loss": {"proxies": jnp.ones((4, 2))}}}
  tx, _ = optim.make_optimizer(dict(name="adamw", lr=0.1, warm_steps=2,
                                    lr_multipliers={"loss_params": 10.0}), 10)
  state, p, seen = tx.init(params), params, []
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    seen.append([float(p["params"]["backbone"]["kernel"][0, 0]),
                 float(p["params"]["embed_head"]["proj"]["kernel"][0, 0]),
                 float(p["loss_params"]["loss"]["proxies"][0, 0])])
  np.testing.assert_allclose(np.array(seen), [[1.0, 0.9, 0.0], [1.0, 0.8, -1.0],
                                              [0.9, 0.7, -2.0], [0.8, 0.6, -3.0]], atol=1e-4)
