"""Large-margin softmax, SphereFace and P2SGrad against PML 2.9.0 on the
same arrays.

PML runs in float64 on the same raw embeddings (rows of norm 0.3 to 4) and
the same learnable tensors (its `W` / `weight` [dim, C] is our `proxies`
transposed); values and gradients w.r.t. the embeddings and the learnable
tensors must agree, for PML's defaults and for a non-default setting.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from jaxdml import losses


def _raw(rng, n=12, dim=8):
  """Rows far from unit length."""
  return (rng.normal(size=(n, dim)) * rng.uniform(0.3, 4.0, size=(n, 1))).astype(np.float32)


def _close(got, want, what, rtol=1e-3):
  """Value or gradient: relative, with an absolute floor at the array's scale."""
  want = np.asarray(want)
  atol = 1e-5 * max(np.abs(want).max(), 1e-6)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=what)


def _t(a, grad=False):
  return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=grad)


# name -> (PML class from (num_classes, dim, hparams), its tensor, settings)
CLASSIFIERS = {
    "large_margin_softmax": (lambda c, d, **hp: pml_losses.LargeMarginSoftmaxLoss(c, d, **hp),
                             [{}, dict(margin=3, scale=2.5)]),
    "sphereface": (lambda c, d, **hp: pml_losses.SphereFaceLoss(c, d, **hp),
                   [{}, dict(margin=2, scale=3.0)]),
    # No hyperparameters: the second case is a table of non-unit rows, which
    # PML renormalises in place before it computes.
    "p2s_grad": (lambda c, d: pml_losses.P2SGradLoss(d, c), [{}, {}]),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_class_vector_losses_equal_pml(name):
  make, settings = CLASSIFIERS[name]
  rng = np.random.default_rng(len(name))
  x = _raw(rng)
  labels = rng.permutation(np.arange(12) % 5).astype(np.int32)  # class 5 absent
  for case, hp in enumerate(settings):
    table = rng.normal(size=(6, 8)).astype(np.float32)
    if name == "p2s_grad" and case == 0:
      table /= np.linalg.norm(table, axis=1, keepdims=True)  # as PML holds it
    pml = make(6, 8, **hp).double()
    pml.collect_stats = True  # for avg_angle
    attr = "weight" if name == "p2s_grad" else "W"
    getattr(pml, attr).data = _t(table.T).clone()
    xt = _t(x, grad=True)
    want = pml(xt, torch.tensor(labels, dtype=torch.long))
    want.backward()
    fn = lambda e, p: losses.get(name)(embeddings=e, labels=jnp.asarray(labels),
                                       loss_params={"proxies": p}, **hp)
    (value, aux), (dx, dp) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
        jnp.asarray(x), jnp.asarray(table))
    what = f"{name} {hp} case {case}"
    _close(value, want.item(), what, rtol=2e-5)
    _close(dx, xt.grad.numpy(), what)
    _close(dp, getattr(pml, attr).grad.numpy().T, what)
    if name != "p2s_grad":
      np.testing.assert_allclose(aux["avg_angle"], pml.avg_angle, rtol=1e-4)


def test_init_params_draw_as_pml_does():
  """Each table is drawn as PML draws its own tensor, compared with PML's."""
  torch.manual_seed(0)
  c, d = 300, 256
  pml_tables = {
      "large_margin_softmax": pml_losses.LargeMarginSoftmaxLoss(c, d).W.data.T,
      "sphereface": pml_losses.SphereFaceLoss(c, d).W.data.T,
      "p2s_grad": pml_losses.P2SGradLoss(d, c).weight.data.T,
  }
  for name, theirs in pml_tables.items():
    ours = np.asarray(losses.init_params(name, jax.random.key(0), num_classes=c,
                                         dim=d)["proxies"])
    theirs = theirs.numpy()
    assert ours.shape == theirs.shape == (c, d), name
    # Normal and uniform differ in mean |a| / std (0.80 against 0.87).
    for stat in (np.std, lambda a: np.mean(np.abs(a))):
      assert stat(ours) == pytest.approx(stat(theirs), rel=0.02), name
    unit_rows = np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert unit_rows == (name == "p2s_grad"), name
  with pytest.raises(ValueError, match="integer >= 1"):
    losses.get("sphereface")(embeddings=jnp.ones((2, 8)), labels=jnp.arange(2),
                             loss_params={"proxies": jnp.ones((3, 8))}, margin=0)
