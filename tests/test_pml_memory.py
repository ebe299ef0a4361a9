"""Cross-batch memory against PML's CrossBatchMemory, batch by batch.

`memory.loss_form="pml"` is PML's wrapper: the batch is enqueued first and the
loss pairs it with the whole memory, its own copies dropped. Both memories
have the same size and are rings filled in the same order, so the pairs are
the same: 8 rows a batch into 20 slots wraps inside the third batch.
Compared per step: the loss, its gradient w.r.t. the batch, and every
filled slot of the memory (embeddings and labels).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_dist
from pytorch_metric_learning import losses as pml_losses

from jaxdml import memory as memory_lib
from test_tasks import compute_loss

SIZE, BATCH, DIM, STEPS = 20, 8, 6, 6

LOSSES = {
    "contrastive": (dict(distance="cosine", pos_margin=0.9, neg_margin=0.3),
                    lambda: pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.3,
                                                       distance=pml_dist.CosineSimilarity())),
    "multi_similarity": ({}, pml_losses.MultiSimilarityLoss),
    "triplet": (dict(distance="cosine", margin=0.1),
                lambda: pml_losses.TripletMarginLoss(margin=0.1,
                                                     distance=pml_dist.CosineSimilarity())),
}


def _config(name, hparams):
  c = ml_collections.ConfigDict(dict(task="single", total_steps=STEPS))
  c.loss = dict(name=name, **hparams)
  c.memory = dict(size=SIZE, start_step=0, adapt="none", adapt_hparams={}, loss_form="pml",
                  weight=1.0)
  return c


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_memory_equals_pml_cross_batch_memory_step_by_step(name):
  hparams, make = LOSSES[name]
  config = _config(name, hparams)
  pml = pml_losses.CrossBatchMemory(make(), DIM, memory_size=SIZE).double()
  memory = memory_lib.init(SIZE, DIM)
  rng = np.random.default_rng(5)
  step_fn = jax.jit(lambda e, y, m, s: jax.value_and_grad(
      lambda e: compute_loss(config, e, {"label": y}, m, s)[0])(e))
  new_memory = jax.jit(lambda e, y, m, s: compute_loss(config, e, {"label": y}, m, s)[2])
  for step in range(STEPS):
    x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    y = rng.integers(0, 4, BATCH).astype(np.int32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want = pml(xt, torch.tensor(y, dtype=torch.long))
    want.backward()
    value, grad = step_fn(jnp.asarray(x), jnp.asarray(y), memory, step)
    memory = new_memory(jnp.asarray(x), jnp.asarray(y), memory, step)
    assert want.item() > 0, step
    np.testing.assert_allclose(value, want.item(), rtol=2e-5, err_msg=f"step {step}")
    g = xt.grad.numpy()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-5 * np.abs(g).max(),
                               err_msg=f"step {step}")
    filled = np.asarray(memory["valid"])
    expect = SIZE if pml.has_been_filled else pml.queue_idx
    assert filled.sum() == expect, step
    np.testing.assert_allclose(np.asarray(memory["embeddings"])[:expect],
                               pml.embedding_memory.numpy()[:expect], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(memory["labels"])[:expect],
                                  pml.label_memory.numpy()[:expect])
