"""The objective: ranking loss, weighted terms fed by what each consumes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdml import losses, objective, tasks
from test_train import load_config


def compute_loss(config, outputs, batch, memory, step, **kwargs):
  """The config's objective on one batch's outputs: (loss, aux, memory)."""
  return objective.Objective.from_config(config)(outputs, batch["label"], memory, step,
                                                 **kwargs)[:3]


def test_progress_is_epoch_over_epochs_or_step_over_steps():
  progress = lambda s, epoch_steps: objective.progress(jnp.asarray(s), total_steps=10,
                                                       epoch_steps=epoch_steps)
  got = [float(progress(s, 3)) for s in (0, 2, 3, 6, 9)]  # 3 epochs
  np.testing.assert_allclose(got, [0, 0, 1 / 3, 2 / 3, 1])
  got = [float(progress(s, 0)) for s in (0, 5, 10, 12)]
  np.testing.assert_allclose(got, [0, 0.5, 1, 1])


def _shift_distill(*, embeddings, labels, teacher_embeddings, progress, offset=0.0):
  """A distillation loss from outside the package: mean squared gap, plus progress."""
  del labels
  value = jnp.mean(jnp.square(embeddings - teacher_embeddings - offset)) + progress
  return value, {"gap_norm": jnp.linalg.norm(embeddings - teacher_embeddings)}


@pytest.fixture
def shift_distill(monkeypatch):
  """Registered for one test: the registry is global, other tests list it."""
  monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
  losses.register("test_shift_distill", _shift_distill, consumes=("teacher", "progress"))


def test_a_registered_term_gets_what_it_consumes_and_is_logged_under_its_name(shift_distill):
  config = load_config("cub_obdsd.py", "smoke,distill=False")
  config.terms = ml_collections.ConfigDict(
      {"mine": dict(loss="test_shift_distill", weight=2.0, offset=0.5)})
  config.epoch_steps = 5  # progress 0 at step 0
  rng = np.random.default_rng(0)
  e, t = (jnp.asarray(rng.normal(size=(8, 4)), jnp.float32) for _ in range(2))
  labels = jnp.repeat(jnp.arange(4), 2)
  ranking, _ = losses.get(config.loss.name)(embeddings=e, labels=labels,
                                            **objective.loss_hparams(config.loss)[1])
  loss, aux, _ = compute_loss(config, e, {"label": labels}, {}, jnp.asarray(0),
                                    teacher_outputs=t)
  term = float(jnp.mean(jnp.square(e - t - 0.5)))
  np.testing.assert_allclose(aux["distill/mine"], term, rtol=1e-6)
  np.testing.assert_allclose(aux["distill/gap_norm"], jnp.linalg.norm(e - t), rtol=1e-6)
  np.testing.assert_allclose(loss, ranking + 2.0 * term, rtol=1e-6)
  with pytest.raises(ValueError, match="consumes 'teacher'.*set config.teacher"):
    compute_loss(config, e, {"label": labels}, {}, jnp.asarray(0))


def test_sbir_terms_see_both_towers_and_the_ranking_loss_pairs_query_with_gallery():
  config = load_config("sketchy_rtl_kd.py")
  rng = np.random.default_rng(1)
  out = {k: jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) for k in ("query", "gallery")}
  teacher = {k: jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) for k in ("query", "gallery")}
  labels = jnp.arange(4)
  loss, aux, _ = compute_loss(config, out, {"label": labels}, {}, jnp.asarray(0),
                                    teacher_outputs=teacher)
  [term] = objective.Objective.from_config(config).terms
  hp, weight = term.hparams, term.weight
  flat = lambda d: jnp.concatenate([d["query"], d["gallery"]])
  want, _ = losses.get("embedding_distill")(embeddings=flat(out), teacher_embeddings=flat(teacher),
                                            **hp)
  np.testing.assert_allclose(aux["distill/embedding_distill"], want, rtol=1e-6)
  rank_name, rank_hp = objective.loss_hparams(config.loss)
  ranking, _ = losses.get(rank_name)(embeddings=out["query"], labels=labels,
                                     ref_embeddings=out["gallery"], ref_labels=labels, **rank_hp)
  np.testing.assert_allclose(loss, ranking + weight * want, rtol=1e-6)


def test_memory_needs_a_loss_that_takes_a_reference_set():
  config = load_config("sop_xbn.py")
  config.loss = ml_collections.ConfigDict(dict(name="koleo"))
  from jaxdml import memory as memory_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="ranking loss that takes a reference set; 'koleo'"):
    compute_loss(config, jnp.ones((4, 3)), {"label": jnp.arange(4)},
                       memory_lib.init(8, 3), jnp.asarray(0))


def test_towers_are_the_one_sbir_map():
  assert tasks.towers("sbir") == {"query": "embed_query", "gallery": "embed_gallery"}
  assert tasks.towers("single") == {"query": None, "gallery": None}
  tree = {"query": jnp.zeros((2, 3)), "gallery": jnp.ones((2, 3))}
  np.testing.assert_array_equal(tasks.flat("sbir", tree), jnp.concatenate([tree["query"],
                                                                           tree["gallery"]]))
  jax.tree.map(np.testing.assert_array_equal, tasks.flat("single", tree), tree)


def _table_distance(*, embeddings, labels, loss_params):
  """Mean squared distance to the own class's row of a learnable table."""
  return jnp.mean(jnp.sum(jnp.square(embeddings - loss_params["table"][labels]), -1)), {}


def test_learnable_parameters_are_made_by_init_params_and_passed_by_term(monkeypatch):
  monkeypatch.setattr(losses, "_REGISTRY", dict(losses._REGISTRY))
  with pytest.raises(ValueError, match="gives init_params"):
    losses.register("test_table", _table_distance, consumes=("params",))
  losses.register("test_table", _table_distance, consumes=("params",),
                  init_params=lambda rng, *, num_classes, dim, offset=0.0: {
                      "table": jnp.full((num_classes, dim), offset)})
  table = losses.init_params("test_table", jax.random.key(0), num_classes=5, dim=3, offset=2.0)
  np.testing.assert_array_equal(table["table"], np.full((5, 3), 2.0))
  with pytest.raises(ValueError, match="'triplet' has no learnable parameters"):
    losses.init_params("triplet", jax.random.key(0), num_classes=5, dim=3)
  config = load_config("cub_obdsd.py", "smoke,distill=False")
  config.terms = ml_collections.ConfigDict({"centres": dict(loss="test_table", weight=0.5)})
  assert objective.Objective.from_config(config).learnable == [("centres", "test_table", {})]
  e, labels = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
  params = {"centres": {"table": jnp.array([[1.0, 1, 1], [0, 0, 0]])}}
  _, aux, _ = compute_loss(config, e, {"label": labels}, {}, jnp.asarray(0),
                                 loss_params=params)
  np.testing.assert_allclose(aux["reg/centres"], 1.5)  # rows of class 1 are 3 away
  with pytest.raises(ValueError, match="consumes 'params'"):
    compute_loss(config, e, {"label": labels}, {}, jnp.asarray(0))


def test_a_configured_miner_mines_the_pairs_the_loss_sees():
  """config.loss.miner: in-batch it equals mining by hand; against the
  cross-batch memory the miner sees the memory too (PML's
  CrossBatchMemory(loss, miner=...))."""
  from jaxdml.losses import miners  # pylint: disable=g-import-not-at-top
  config = load_config("sop_xbn.py", "smoke")
  rng = np.random.default_rng(0)
  e = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])
  miner = dict(name="triplet_margin", margin=0.3, type_of_triplets="semihard")
  config.memory.size = 0
  config.loss = dict(name="triplet", margin=0.2, miner=miner)
  loss, _, _ = compute_loss(config, e, {"label": labels}, {}, jnp.asarray(0))
  by_hand = miners.triplet_margin(embeddings=e, labels=labels, margin=0.3,
                                  type_of_triplets="semihard")
  want, _ = losses.get("triplet")(embeddings=e, labels=labels, margin=0.2, mined=by_hand)
  unmined, _ = losses.get("triplet")(embeddings=e, labels=labels, margin=0.2)
  assert float(loss) == pytest.approx(float(want)) and float(want) != pytest.approx(float(unmined))
  # Against the memory: the miner's [B, R] selection matches the loss's pairs.
  from jaxdml import memory as memory_lib  # pylint: disable=g-import-not-at-top
  config.memory.size = 16
  memory = memory_lib.init(16, 4)
  with_memory = []
  for loss_config in (dict(name="triplet", margin=0.2, miner=miner),
                      dict(name="triplet", margin=0.2)):
    config.loss = loss_config
    with_memory.append(compute_loss(config, e, {"label": labels}, memory,
                                          jnp.asarray(0))[0])
  assert np.isfinite(with_memory[0]) and float(with_memory[0]) != pytest.approx(
      float(with_memory[1]))
