"""The XBM/XBN and IRT recipes' loss equals XBM's own code, step by step.

The torch reference below is written from msight-tech/research-xbm
(`ret_benchmark/losses/contrastive_loss.py`, `modeling/xbm.py` and the loop
in `engine/trainer.py`): per anchor, the sum of 1 - s over positives (its own
copy dropped by s < 1 - 1e-5) and of s over negatives with s > 0.5, averaged
over the batch; the batch term plus the memory term (weight 1), the detached
batch enqueued before the memory term, from iteration > START_ITERATION.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdml import memory as memory_lib
from test_tasks import compute_loss
from jaxdml import config as config_lib

torch = pytest.importorskip("torch")

MARGIN = 0.5


def xbm_contrastive(inputs_col, targets_col, inputs_row, target_row):
  """XBM's ContrastiveLoss.forward; also returns its number of active negatives."""
  sim_mat = inputs_col @ inputs_row.t()
  losses, active_negatives = [], 0
  for i in range(inputs_col.shape[0]):
    pos = sim_mat[i][targets_col[i] == target_row]
    pos = pos[pos < 1 - 1e-5]
    neg = sim_mat[i][targets_col[i] != target_row]
    neg = neg[neg > MARGIN]
    active_negatives += len(neg)
    losses.append(torch.sum(1 - pos) + (torch.sum(neg) if len(neg) else 0))
  return sum(losses) / inputs_col.shape[0], active_negatives


class XbmQueue:
  """XBM's `modeling/xbm.py` ring buffer (labels must be non-zero there).

  With one fix: XBM leaves its pointer at the end of the buffer when a batch
  fills it exactly (`ptr += q` reaches K), and the next batch then overwrites
  the newest slots, not the oldest. jaxdml's memory is a true FIFO, as the
  paper describes; the pointer wraps here the same way.
  """

  def __init__(self, size, dim):
    self.feats = torch.zeros(size, dim, dtype=torch.float64)
    self.targets = torch.zeros(size, dtype=torch.long)
    self.ptr = 0

  def get(self):
    if self.targets[-1].item() != 0:
      return self.feats, self.targets
    return self.feats[:self.ptr], self.targets[:self.ptr]

  def enqueue_dequeue(self, feats, targets):
    q = len(targets)
    if self.ptr + q > len(self.targets):
      self.feats[-q:], self.targets[-q:], self.ptr = feats, targets, 0
    else:
      self.feats[self.ptr:self.ptr + q] = feats
      self.targets[self.ptr:self.ptr + q] = targets
      self.ptr = (self.ptr + q) % len(self.targets)  # XBM: self.ptr += q


def _xbm_config(size, start_step, adapt="none"):
  c = ml_collections.ConfigDict()
  c.task = "single"
  c.loss = dict(name="contrastive", distance="cosine", pos_margin=1.0,
                neg_margin=MARGIN, reduction="per_anchor_sum")
  c.memory = dict(size=size, start_step=start_step, adapt=adapt, adapt_hparams={},
                  loss_form="xbm", weight=1.0)
  c.teacher = None
  return c


def _hidden_batch(rng, batch, dim, classes):
  """Raw (un-normalised) features of 4 images per class; labels 1.. as XBM needs."""
  labels = np.repeat(rng.choice(np.arange(1, classes + 1), batch // 4, replace=False), 4)
  feats = rng.normal(size=(batch, dim)) + 0.7 * rng.normal(size=(classes + 1, dim))[labels]
  return feats.astype(np.float32), labels


@pytest.mark.parametrize("start_step", [0, 2])
def test_equals_xbm_code_in_value_and_gradient(start_step):
  size, batch, dim, classes, steps = 48, 16, 12, 10, 7  # the memory wraps twice
  config = _xbm_config(size, start_step)
  rng = np.random.default_rng(start_step)
  memory = memory_lib.init(size, dim)
  queue = XbmQueue(size, dim)

  def ours(feats, labels, memory, step):
    loss, aux, memory = compute_loss(config, feats, {"label": labels}, memory, step)
    return loss, (aux, memory)

  grad_fn = jax.jit(jax.value_and_grad(ours, has_aux=True))
  for step in range(steps):
    feats, labels = _hidden_batch(rng, batch, dim, classes)
    (loss, (aux, memory)), grad = grad_fn(jnp.asarray(feats), jnp.asarray(labels, jnp.int32),
                                          memory, step)

    # XBM's model ends in an L2 normalisation; jaxdml's cosine has it inside.
    x = torch.tensor(feats, dtype=torch.float64, requires_grad=True)
    f = torch.nn.functional.normalize(x, dim=1)
    t = torch.tensor(labels)
    ref, negatives = xbm_contrastive(f, t, f, t)
    if step + 1 > start_step:  # XBM's `iteration > START_ITERATION`
      queue.enqueue_dequeue(f.detach(), t)
      mem_loss, mem_negatives = xbm_contrastive(f, t, *queue.get())
      ref, negatives = ref + mem_loss, negatives + mem_negatives
      np.testing.assert_allclose(aux["loss/memory_term"] + MARGIN * mem_negatives / batch,
                                 mem_loss.item(), rtol=1e-5)
    else:
      assert float(aux["loss/memory_term"]) == 0.0
    ref.backward()
    # XBM charges an active negative s, IRT (and jaxdml) s - 0.5: the values
    # differ by 0.5 per active negative / batch, the gradients not at all.
    np.testing.assert_allclose(loss + MARGIN * negatives / batch, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-4, atol=1e-6)
  # jaxdml stores the embeddings as the loss saw them: raw here, normalised
  # in XBM (its model normalises), so compare directions.
  stored = np.asarray(memory["embeddings"])
  stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
  np.testing.assert_allclose(stored, queue.feats.numpy(), atol=1e-6)
  np.testing.assert_array_equal(memory["labels"], queue.targets.numpy())


def test_enqueued_reference_set_drops_each_anchor_own_copy():
  mem = memory_lib.init(8, 2)
  mem = memory_lib.enqueue(mem, jnp.ones((6, 2)), jnp.arange(6))
  batch = jnp.arange(10, dtype=jnp.float32).reshape(5, 2)
  ref = memory_lib.enqueued_reference_set(mem, mem["embeddings"] * 3, batch, jnp.arange(5) + 10)
  # Pointer 6: the batch takes slots 6, 7, 0, 1, 2; slots 3-5 keep the
  # adapted (x3) stale rows.
  np.testing.assert_array_equal(ref["ref_self_index"], [6, 7, 0, 1, 2])
  np.testing.assert_array_equal(ref["ref_embeddings"][ref["ref_self_index"]], batch)
  np.testing.assert_array_equal(ref["ref_embeddings"][3:6], 3.0)
  np.testing.assert_array_equal(ref["ref_labels"], [12, 13, 14, 3, 4, 5, 10, 11])
  assert bool(ref["ref_valid"].all())
  # A batch larger than the memory keeps its last rows; the others have no copy.
  big = jnp.arange(20, dtype=jnp.float32).reshape(10, 2)
  ref = memory_lib.enqueued_reference_set(mem, mem["embeddings"], big, jnp.arange(10))
  np.testing.assert_array_equal(ref["ref_self_index"], [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(ref["ref_embeddings"][ref["ref_self_index"][2:]], big[2:])


@pytest.mark.parametrize("recipe", ["sop_xbn.py", "inshop_xbn.py", "deepfashion2_xbn.py",
                                    "sop_irt.py", "cub_irt.py", "inshop_irt.py"])
def test_memory_recipes_use_xbm_loss(recipe):
  for arg in ("", "demo"):
    config = config_lib.load_config(f"configs/{recipe}", arg)
    assert (config.loss.name, config.loss.reduction) == ("contrastive", "per_anchor_sum")
    assert (config.memory.loss_form, config.memory.weight) == ("xbm", 1.0)


def test_irt_recipe_is_contrastive_sum_plus_koleo_on_the_batch():
  config = config_lib.load_config("configs/sop_irt.py", "smoke")
  assert config.loss.reduction == "per_anchor_sum" and config.memory.loss_form == "xbm"
  assert config.terms.to_dict() == {"koleo": {"weight": 0.7}}
  rng = np.random.default_rng(0)
  feats, labels = _hidden_batch(rng, 8, 16, 6)
  memory = memory_lib.init(int(config.memory.size), 16)
  loss, aux, _ = compute_loss(config, jnp.asarray(feats),
                                    {"label": jnp.asarray(labels, jnp.int32)}, memory, 5)
  parts = aux["loss/batch_term"] + aux["loss/memory_term"] + 0.7 * aux["reg/koleo"]
  np.testing.assert_allclose(loss, parts, rtol=1e-6)
  assert float(aux["loss/memory_term"]) > 0  # the batch's copies are in the memory
  no_koleo = config_lib.load_config("configs/sop_irt.py", "smoke,koleo=0")
  assert no_koleo.terms.to_dict() == {}


def test_kalman_recipe_spells_out_its_filter_settings():
  """So `--config.memory.adapt_hparams.process_noise=...` has a field to set."""
  config = config_lib.load_config("configs/sop_xbn.py", "demo,adapt=kalman")
  hparams = dict(config.memory.adapt_hparams)
  assert hparams == {"process_noise": 0.1, "measurement_noise": 1.0, "adaptive": True}
  memory = memory_lib.init(8, 4)
  adapted, _ = memory_lib.adapt(memory, jnp.ones((4, 4)), method="kalman", **hparams)
  assert adapted.shape == (8, 4)


def test_unknown_memory_loss_form_is_named():
  config = _xbm_config(8, 0)
  config.memory.loss_form = "both"
  with pytest.raises(ValueError, match=r"memory.loss_form='both'.*'joint', 'xbm'"):
    compute_loss(config, jnp.ones((4, 3)), {"label": jnp.arange(4)}, memory_lib.init(8, 3), 0)
  # Its old name, easily confused with config.terms, names the new one.
  config.memory = dict(config.memory.to_dict(), terms="xbm")
  del config.memory["loss_form"]
  with pytest.raises(ValueError, match="config.memory.terms was renamed: use config.memory.loss_form"):
    compute_loss(config, jnp.ones((4, 3)), {"label": jnp.arange(4)}, memory_lib.init(8, 3), 0)
