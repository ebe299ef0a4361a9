"""Every loss family trains from a config through the real train step.

Each run is the `smoke` single-task recipe (tiny ResNet, embedded synthetic
data, memory off) with its loss swapped, a few steps of the jitted step
built from the parts. One compile covers several families: the losses that
consume learnable parameters, a random key or running state ride along as
weighted `config.terms` of one run, each logged under `reg/NAME`.
"""

import contextlib
import dataclasses

import jax
import numpy as np
import pytest

from jaxdml import build, checkpoint, objective as objective_lib, sharding, train
from jaxdml import config as config_lib
from test_build import _Unreadable
from test_train import load_config

# Batch 8 of 4 classes x 2 rows: the manifold loss's K proxies must not
# outnumber the batch.
PARAMETRIC_AND_RANDOM_TERMS = {
    "angular": dict(weight=0.5),
    "nca": dict(weight=0.5),
    "histogram": dict(weight=0.5),
    "pnp": dict(weight=0.5),
    "large_margin_softmax": dict(weight=0.1),
    "p2s_grad": dict(weight=0.1),
    "manifold": dict(weight=0.1, K=4),
}


def family_config(loss, terms=None, **data):
  config = load_config("sop_xbn.py", "smoke")
  config.memory.size = 0
  config.loss = loss
  config.terms = terms or {}
  for key, value in data.items():
    config.data[key] = value
  return config


def run_steps(parts, step_fn, state, start, steps):
  """`steps` train steps from `start` on the parts' own batches: (state, metrics)."""
  batches = parts.train_batches(start)
  history = []
  try:
    for _ in range(steps):
      state, metrics = step_fn(state, sharding.global_batch(next(batches), parts.mesh))
      history.append(jax.device_get(metrics))
  finally:
    batches.close()
  return state, history


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trained(before, after, history):
  """Finite losses, and every encoder parameter array moved."""
  assert all(bool(m["finite"]) and np.isfinite(m["loss"]) for m in history), history
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"],
                       after["params"])
  assert all(jax.tree.leaves(moved)), moved


def test_stateful_ranking_loss_with_parametric_random_and_pair_terms(tmp_path):
  """dynamic_soft_margin (running state) as the ranking loss; pairs,
  similarity-distribution, margin-softmax proxy and manifold (rng +
  proxies, no labels) losses as terms; a hierarchical sampler; the step
  built from parts whose config cannot be read. The state's histogram
  moves every step and a run resumed from a checkpoint takes the same
  steps as the uninterrupted one."""
  config = family_config(
      dict(name="dynamic_soft_margin"), PARAMETRIC_AND_RANDOM_TERMS, single_labels="instance",
      sampler=dict(name="hierarchical", super_label="category", samples_per_class=2))
  parts = build.build(config)
  assert parts.shardings["loss_state"]["loss"]["hist"].is_fully_replicated  # as the memory
  blind = dataclasses.replace(parts, config=_Unreadable())
  step_fn = train.make_train_step(blind)
  state = blind.create_state()
  before = host(state)
  assert set(before["loss_state"]) == {"loss"}
  assert set(before["loss_params"]) == {"large_margin_softmax", "p2s_grad", "manifold"}
  np.testing.assert_array_equal(before["loss_state"]["loss"]["hist"], np.zeros(10))

  state, first = run_steps(parts, step_fn, state, 0, 2)
  at_two = host(state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, state, force=True)
  state, rest = run_steps(parts, step_fn, state, 2, 2)
  straight = host(state)
  history = first + rest

  assert_trained(before, straight, history)
  for term in PARAMETRIC_AND_RANDOM_TERMS:
    assert all(np.isfinite(m[f"reg/{term}"]) for m in history), term
  for key, proxies in before["loss_params"].items():
    assert not np.allclose(proxies["proxies"], straight["loss_params"][key]["proxies"]), key
  hists = [before, at_two, straight]
  for older, newer in zip(hists, hists[1:]):
    assert not np.allclose(older["loss_state"]["loss"]["hist"],
                           newer["loss_state"]["loss"]["hist"])
  np.testing.assert_allclose(straight["loss_state"]["loss"]["hist"].sum(), 1.0, rtol=1e-5)
  assert all(m["loss/triplets"] > 0 for m in history)

  resumed = ckpt.restore(parts.restore_target(), 2)
  ckpt.close()
  resumed, again = run_steps(parts, step_fn, resumed, 2, 2)
  assert [float(m["loss"]) for m in again] == pytest.approx([float(m["loss"]) for m in rest],
                                                            abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               host(resumed), straight)


@pytest.mark.parametrize("loss", [
    dict(name="vicreg"),
    # The same two-view path with PML's wrapper (~15 s more), in the slow suite.
    pytest.param(dict(name="self_supervised", loss=dict(name="ntxent", temperature=0.1)),
                 marks=pytest.mark.slow),
], ids=lambda loss: loss["name"])
def test_two_view_losses_train_on_two_views_of_each_image(loss):
  """With data.views = dict(num=2) each image of the batch comes as two
  augmented views in consecutive rows; the objective passes the first as
  embeddings and the second as ref_embeddings."""
  parts = build.build(family_config(loss, views=dict(num=2)))
  assert parts.objective.two_views and parts.objective.views == 2
  images = parts.config.batch_size
  with contextlib.closing(parts.train_batches(0)) as batches:
    labels = next(batches)["label"]
  assert labels.shape == (2 * images,)
  np.testing.assert_array_equal(labels[0::2], labels[1::2])  # an image's two views
  state = parts.create_state()
  before = host(state)
  state, history = run_steps(parts, train.make_train_step(parts), state, 0, 2)
  assert_trained(before, host(state), history)
  if loss["name"] == "vicreg":  # two different views: the invariance term is not zero
    assert all(m["loss/invariance"] > 0 for m in history)
  else:  # ntxent on 2B rows: each view's one positive is the other view
    assert all(m["loss/pos_pairs"] == 2 * images for m in history)


def test_multiple_losses_with_a_sampling_miner_on_fixed_triplets_log_each_term():
  """PML's MultipleLosses from config.loss; config.loss.miner (the
  distance-weighted miner, drawing from the step's key) mines both terms'
  pairs; batches of whole triplets (fixed_set_of_triplets)."""
  loss = dict(name="multiple", losses=dict(c="contrastive", t=dict(name="triplet", margin=0.1)),
              weights=dict(c=1.0, t=0.5), miner=dict(name="distance_weighted", cutoff=0.5))
  config = family_config(loss, sampler=dict(name="fixed_set_of_triplets", num_triplets=60))
  config.batch_size = 24  # whole triplets, split over the 8 test devices
  parts = build.build(config)
  assert "rng" in parts.objective.consumed
  with contextlib.closing(parts.train_batches(0)) as batches:
    labels = [next(batches)["label"] for _ in range(2)]
  state = parts.create_state()
  before = host(state)
  state, history = run_steps(parts, train.make_train_step(parts), state, 0, 2)
  assert_trained(before, host(state), history)
  for m, y in zip(history, labels):
    np.testing.assert_allclose(m["loss"], m["loss/c"] + 0.5 * m["loss/t"], rtol=1e-5)
    positive_pairs = np.sum(y[:, None] == y[None, :]) - len(y)
    # The miner: at most one negative per positive pair (all triplets: far more).
    assert 0 < m["loss/t/num_triplets"] <= positive_pairs


@pytest.mark.parametrize("change,message", [
    (dict(loss=dict(name="vicreg")), r"set config.data.views = dict\(num=2\)"),
    (dict(loss=dict(name="self_supervised", loss="ntxent"), views=dict(num=3)),
     r"not 3 view"),
    (dict(loss=dict(name="vicreg"), views=dict(num=2), memory=16), "takes a reference set"),
    (dict(loss=dict(name="manifold", K=4), memory=16), "takes a reference set"),
    (dict(loss=dict(name="dynamic_soft_margin"), memory=16), "keeps running state"),
    (dict(loss=dict(name="multiple", losses=["contrastive", "proxy_anchor"])),
     r"'proxy_anchor' consumes \['params'\]"),
    (dict(loss=dict(name="self_supervised", loss="proxy_anchor")), "does not support"),
    (dict(loss=dict(name="multiple", losses=["contrastive"], weigths=[1.0])),
     r"multiple\(...\) cannot be built"),
    (dict(loss=dict(name="multiple", losses=["contrastiv"])), "Unknown loss 'contrastiv'"),
    (dict(loss=dict(name="self_supervised")), "wraps no loss"),
    (dict(loss=dict(name="triplet"), terms=dict(vicreg=dict(weight=1.0)), views=dict(num=2)),
     "taken as config.loss only"),
])
def test_settings_that_cannot_train_fail_at_build_time(change, message):
  config = family_config(change["loss"], change.get("terms"))
  if "views" in change:
    config.data.views = change["views"]
  config.memory.size = change.get("memory", 0)
  with pytest.raises(ValueError, match=message):
    build.build(config)


def test_a_state_without_stateful_losses_keeps_its_layout():
  """No `loss_state` entry unless a loss keeps state: checkpoints of runs
  from before it restore onto the same target."""
  plain = build.build(family_config(dict(name="triplet"))).abstract
  assert "loss_state" not in plain
  stateful = build.build(family_config(dict(name="triplet"),
                                       dict(dsm=dict(loss="dynamic_soft_margin")))).abstract
  assert jax.tree.map(lambda a: a.shape, stateful["loss_state"]) == {"dsm": {"hist": (10,)}}
  assert set(stateful) - set(plain) == {"loss_state"}


def test_each_term_draws_from_its_own_key_and_a_new_one_each_step():
  """Two manifold terms with the same proxies draw different assignments
  (keys folded with their own tags); a term's draw follows the step's key."""
  terms = {"m1": dict(loss="manifold", K=4), "m2": dict(loss="manifold", K=4)}
  objective = objective_lib.Objective.from_config(config_lib.resolve(family_config(None, terms)))
  embeddings = jax.random.normal(jax.random.key(0), (8, 16))
  proxies = {"proxies": jax.random.normal(jax.random.key(1), (4, 16))}
  labels = np.repeat(np.arange(4), 2)

  def values(seed):
    _, aux, _, _ = objective(embeddings, labels, {}, 0,
                             loss_params={"m1": proxies, "m2": proxies}, rng=jax.random.key(seed))
    return float(aux["reg/m1"]), float(aux["reg/m2"])

  first, again, other = values(0), values(0), values(1)
  assert first == again
  assert first[0] != first[1]
  assert first[0] != other[0] and first[1] != other[1]
  with pytest.raises(ValueError, match="consumes 'rng'"):
    objective(embeddings, labels, {}, 0, loss_params={"m1": proxies, "m2": proxies})
