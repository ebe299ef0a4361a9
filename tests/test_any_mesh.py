"""Any mesh: `jax.make_mesh`'s Explicit axes (its default) and Auto axes.

Every registered loss and its wrappers, every miner and the cross-batch
memory give on a batch sharded over 8 devices of such a mesh what they give
on one device, value and gradient; exact search, the train step and the
embed functions what they give on the default mesh. Explicit axes are checked both
inside `jax.set_mesh` and with the sharded arrays alone (their types carry
the mesh); Auto axes inside `jax.set_mesh` (the suite's other sharded tests
cover a Mesh built without one).
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxdml import build, inference, losses, memory, sharding, train
from jaxdml.losses import miners
from jaxdml.retrieval import Index, exact
import test_losses
from test_train import load_config

EXPLICIT, AUTO = (AxisType.Explicit,), (AxisType.Auto,)
# (axis types, inside jax.set_mesh): the ways a user hands us a mesh.
MODES = [(EXPLICIT, True), (EXPLICIT, False), (AUTO, True)]
# The loss sweep on Auto axes outside set_mesh is test_losses' own; inside it,
# and on Explicit arrays outside set_mesh (the miners, the memory and the
# wrappers check that path fast), compiling the sweep again (~30 s each) is
# for the slow suite.
LOSS_GROUPS = 15
LOSS_MODES = [MODES[0]] + [pytest.param(*m, marks=pytest.mark.slow) for m in MODES[1:]]
MODE_IDS = ["explicit-set_mesh", "explicit-arrays-only", "auto-set_mesh"]


def _mesh(types):
  return jax.make_mesh((8,), ("data",), axis_types=types)


def _context(mesh, use_set_mesh):
  return jax.set_mesh(mesh) if use_set_mesh else contextlib.nullcontext()


def _close(got, want, what):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                               err_msg=what)


def test_explicit_is_what_make_mesh_gives():
  """The case these tests are for: jax.make_mesh's default axis type."""
  assert jax.make_mesh((8,), ("data",)).axis_types == EXPLICIT


@pytest.mark.parametrize("types,use_set_mesh", LOSS_MODES, ids=MODE_IDS)
def test_every_loss_matches_one_device(types, use_set_mesh):
  """test_losses' sweep (every registered loss with the inputs it consumes,
  a memory variant and a mined triplet loss), value and gradient."""
  batch = test_losses._fake_batch(0)
  want = test_losses._every_loss_compiled(1)(batch)
  mesh = _mesh(types)
  sharded = test_losses._put(batch, mesh)
  got = {}
  with _context(mesh, use_set_mesh):
    # As test_losses, several programs, so that the fake devices' collectives
    # never wait on each other's thread pool (XLA aborts after 40 s); the
    # Explicit sweep holds more of them (the auto_axes boundaries): smaller.
    for group in range(LOSS_GROUPS):
      got.update(jax.jit(functools.partial(
          test_losses._every_loss, group=group, groups=LOSS_GROUPS))(sharded))
  assert set(got) == set(want)
  assert {k.split("-", 1)[1] for k in got} >= set(losses.names())
  assert got["0-triplet"][1].sharding.num_devices == 8
  for key in want:
    _close(got[key], want[key], key)


def _wrapped_losses(e, second_view, y):
  """value_and_grad of PML's wrappers: two views joined, and two terms,
  one with its miner."""
  views = losses.self_supervised("ntxent")
  both = losses.multiple(["triplet", "contrastive"], weights=[1.0, 0.5],
                         miners=[{"name": "multi_similarity"}, None])
  return {
      "self_supervised": jax.value_and_grad(
          lambda e: views(embeddings=e, ref_embeddings=second_view)[0])(e),
      "multiple": jax.value_and_grad(lambda e: both(embeddings=e, labels=y)[0])(e)}


@pytest.mark.parametrize("types,use_set_mesh", MODES[:2], ids=MODE_IDS[:2])
def test_loss_wrappers_match_one_device(types, use_set_mesh):
  batch = test_losses._fake_batch(0)
  arrays = (batch["embeddings"], batch["teacher"], batch["labels"])
  want = jax.jit(_wrapped_losses)(*arrays)
  mesh = _mesh(types)
  with _context(mesh, use_set_mesh):
    got = jax.jit(_wrapped_losses)(*jax.device_put(arrays, NamedSharding(mesh, P("data"))))
  for key in want:
    _close(got[key], want[key], key)
    assert float(want[key][0]) > 0, key


def test_a_loss_runs_eagerly_on_explicit_arrays():
  """Without jit, on the sharded arrays themselves, with and without
  jax.set_mesh (the sweep above checks the gradients under jit)."""
  batch = test_losses._fake_batch(0)
  mesh = _mesh(EXPLICIT)
  e, y = (jax.device_put(batch[k], NamedSharding(mesh, P("data")))
          for k in ("embeddings", "labels"))
  fn = losses.get("multi_similarity")
  want = fn(embeddings=batch["embeddings"], labels=batch["labels"])
  _close(fn(embeddings=e, labels=y), want, "multi_similarity, arrays only")
  with jax.set_mesh(mesh):
    _close(fn(embeddings=e, labels=y), want, "multi_similarity, set_mesh")


def _all_miners(e, y, rng):
  """Every miner's selection of the batch, the listed forms included."""
  out = {name: miners.get(name)(embeddings=e, labels=y)
         for name in miners.names() if name not in miners.SAMPLING}
  out["distance_weighted"] = miners.distance_weighted(embeddings=e, labels=y, rng=rng)
  out["uniform_histogram"] = miners.uniform_histogram(embeddings=e, labels=y, rng=rng)
  out["distance_weighted_probabilities"] = miners.distance_weighted_probabilities(
      embeddings=e, labels=y)
  listed = (y[:8] % 24, (y[:8] + 5) % 24, (y[:8] + 11) % 24)
  out["from_indices"] = miners.from_indices(listed, shape=(24, 24))
  out["from_triplets"] = miners.from_triplets(jnp.stack(listed, 1), shape=(24, 24))
  return out


@pytest.mark.parametrize("types,use_set_mesh", MODES, ids=MODE_IDS)
def test_every_miner_matches_one_device(types, use_set_mesh):
  rng = np.random.RandomState(3)
  e = rng.randn(24, 8).astype(np.float32)  # 24: 8 devices, and triplets of rows
  y = (np.arange(24) // 3 % 4).astype(np.int32)
  want = jax.jit(_all_miners)(e, y, jax.random.key(0))
  mesh = _mesh(types)
  rows = NamedSharding(mesh, P("data"))
  with _context(mesh, use_set_mesh):
    got = jax.jit(_all_miners)(jax.device_put(e, rows), jax.device_put(y, rows),
                               jax.random.key(0))
  assert set(got) == set(want) and set(miners.names()) <= set(got)
  for name in want:
    _close(got[name], want[name], name)
  assert float(np.asarray(want["triplet_margin"].pos).sum()) > 0  # something was mined


FORMS = [("joint", "kalman"), ("xbm", "none"), ("pml", "moments")]


def _memory_step(e, y, mem):
  """Per loss form: the loss, its gradient and the memory it leaves; and a
  plain enqueue."""
  out = {"enqueue": memory.enqueue(mem, e, y)}
  for form, adapt in FORMS:
    settings = memory.Settings(size=32, adapt=adapt, loss_form=form)

    def loss(e, settings=settings):
      value, _, new = memory.loss_with_memory(
          settings, losses.get("contrastive"), {}, e, y, mem, 1, batch_keys=e)
      return value, new
    (value, new), grad = jax.value_and_grad(loss, has_aux=True)(e)
    out[form] = (value, grad, new)
  return out


@pytest.mark.parametrize("types,use_set_mesh", MODES, ids=MODE_IDS)
def test_memory_enqueue_and_loss_match_one_device(types, use_set_mesh):
  rng = np.random.RandomState(4)
  e = rng.randn(16, 8).astype(np.float32)
  y = rng.randint(0, 4, 16).astype(np.int32)
  mem = memory.enqueue(memory.init(32, 8), rng.randn(24, 8).astype(np.float32),
                       rng.randint(0, 4, 24).astype(np.int32))  # 24 of 32 slots filled
  want = jax.jit(_memory_step)(e, y, mem)
  mesh = _mesh(types)
  rows = NamedSharding(mesh, P("data"))
  with _context(mesh, use_set_mesh):
    got = jax.jit(_memory_step)(jax.device_put(e, rows), jax.device_put(y, rows),
                                jax.device_put(mem, NamedSharding(mesh, P())))
  for key in want:
    _close(got[key], want[key], key)
  assert int(got["enqueue"]["valid"].sum()) == 32 and float(want["joint"][0]) > 0


@pytest.mark.parametrize("use_set_mesh", [True, False], ids=["set_mesh", "mesh-argument"])
def test_exact_search_on_an_explicit_mesh(use_set_mesh):
  """A user's Explicit mesh gives the search its devices: same neighbours,
  scores and first-hit ranks as the default mesh; an Index under it too."""
  rng = np.random.RandomState(5)
  q, g = rng.randn(20, 8).astype(np.float32), rng.randn(50, 8).astype(np.float32)
  q_labels, g_labels = rng.randint(0, 4, 20), rng.randint(0, 4, 50)
  want = exact.search(q, g, 5, mesh=exact.default_mesh())
  want_ranks = exact.first_hit_ranks(q, g, q_labels, g_labels, mesh=exact.default_mesh())
  mesh = _mesh(EXPLICIT)
  with _context(mesh, use_set_mesh):
    got = exact.search(q, g, 5, mesh=None if use_set_mesh else mesh)
    ranks = exact.first_hit_ranks(q, g, q_labels, g_labels, mesh=mesh)
    gallery = jax.device_put(g[:48], NamedSharding(mesh, P("data")))
    index_hits = Index.build(gallery, backend="exact").search(q, 5)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_array_equal(ranks, want_ranks)
  np.testing.assert_array_equal(index_hits[1], exact.search(q, g[:48], 5)[1])


def test_a_train_step_on_an_explicit_mesh_equals_the_default_mesh_step():
  """build(mesh=) with jax.make_mesh's mesh, under jax.set_mesh, the batch
  put on that mesh: the same step as the config's own mesh; and the same
  embeddings from towers bound on that mesh."""
  config = load_config("sop_xbn.py", "smoke,adapt=kalman")  # memory, adapted: the most parts
  parts = build.build(config)
  batch = next(parts.train_batches(0))
  want, want_metrics = train.make_train_step(parts)(
      parts.create_state(), sharding.global_batch(batch, parts.mesh))
  mesh = _mesh(EXPLICIT)
  with jax.set_mesh(mesh):
    user = build.build(config, mesh=mesh)
    assert user.mesh.devices.tolist() == mesh.devices.tolist()
    got, metrics = train.make_train_step(user)(
        user.create_state(), sharding.global_batch(batch, mesh))
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
  assert float(metrics["loss"]) > 0 and "memory_fill" in metrics
  _close(jax.device_get(got), jax.device_get(want), "state after one step")
  # What evaluation embeds with: the towers bound on the user's mesh.
  size = int(config.data.image_size)
  images = np.random.default_rng(0).integers(0, 256, (12, size, size, 3), dtype=np.uint8)
  want_embedded = inference.embed_all(parts.embed_fns(want)["gallery"], images, 8, parts.mesh)
  with jax.set_mesh(mesh):
    bound = parts.towers.bind(mesh, build.model_variables(want))["gallery"]
    embedded = inference.embed_all(bound, images, 8, mesh)
  np.testing.assert_allclose(embedded, want_embedded, rtol=1e-5, atol=1e-6)
  assert embedded.shape[0] == 12 and np.abs(embedded).sum() > 0


def test_a_run_takes_a_users_mesh(tmp_path):
  """train.setup (as train_and_evaluate) with an Explicit mesh of 4 of the
  8 devices: the run's parts live on those 4, with Auto axes."""
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[4:])
  parts, ckpt = train.setup(load_config("sop_xbn.py", "smoke"), str(tmp_path), mesh=mesh)
  ckpt.close()
  assert parts.mesh.devices.tolist() == jax.devices()[4:]
  assert parts.mesh.axis_types == AUTO
