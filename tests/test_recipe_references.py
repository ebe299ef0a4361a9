"""Each recipe's configured loss equals its authors' code (XBM: test_xbm_reference.py).

The torch references are transcribed from the public code, a few lines each:
- OBD-SD (ZelongZeng/OBD-SD_Pytorch, `criteria/multisimilarity_obd_sd.py`):
  Multi-Similarity with its miner, averaged over the anchors that kept a
  mined pair, plus (epoch / epochs) * lambda * tau^2 * KL(batchmean) towards
  the diffused teacher similarities.
- RAML (pavelsuma/raml, `lib/layers/functional.py`, `lib/layers/loss.py`):
  per image, the mean over views of (1 - s.t + eps)^2 plus the off-diagonal
  MSEs of S T^T and S S^T against T T^T, summed over the images.
The losses are called with the hyperparameters the recipe files resolve to,
so a recipe that drifts from its reference fails here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml import losses, objective
from jaxdml import config as config_lib

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")


def _hparams(cfg):
  return objective.loss_hparams(cfg)


def obdsd_multi_similarity(x, y, alpha, beta, margin, thresh):
  sim = x @ x.t()
  per_anchor = []
  for i in range(len(x)):
    pos = y == y[i]
    pos[i] = False
    s_p, s_n = sim[i][pos], sim[i][y != y[i]]
    keep_n, keep_p = s_n + margin > s_p.min(), s_p - margin < s_n.max()
    if not keep_n.any() or not keep_p.any():
      continue
    per_anchor.append(torch.log(1 + torch.exp(-alpha * (s_p[keep_p] - thresh)).sum()) / alpha
                      + torch.log(1 + torch.exp(beta * (s_n[keep_n] - thresh)).sum()) / beta)
  return torch.stack(per_anchor).mean(), len(per_anchor)


def obdsd_distillation(s, t, *, lambda_, omega, tau_d, progress, tau=1.0):
  sim, t_sim, eye = s @ s.t(), t @ t.t(), torch.eye(len(s), dtype=s.dtype)
  w = torch.softmax((t_sim - eye * 1e9) / tau_d, 1)
  target = (1 - omega) * torch.inverse(eye - omega * w) @ torch.softmax(t_sim / tau, 1)
  kl = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(sim / tau, 1), target)
  return progress * lambda_ * tau**2 * kl


def _clustered(seed, n, dim, spread, per_class=2):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(n // per_class), per_class)
  x = spread * rng.normal(size=(n // per_class, dim))[labels] + rng.normal(size=(n, dim))
  x *= rng.uniform(0.5, 2.0, (n, 1))  # un-normalised: both sides normalise
  return x.astype(np.float32), labels


@pytest.mark.parametrize("spread", [0.0, 0.8])
def test_obdsd_ranking_loss_equals_authors_code(spread):
  config = config_lib.load_config("configs/cub_obdsd.py")
  name, hp = _hparams(config.loss)
  x, y = _clustered(1, 56, 32, spread)
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  ref, kept = obdsd_multi_similarity(F.normalize(xt, dim=1), torch.tensor(y), hp["alpha"],
                                     hp["beta"], hp["miner_epsilon"], hp["base"])
  ref.backward()
  value, grad = jax.value_and_grad(
      lambda e: losses.get(name)(embeddings=e, labels=jnp.asarray(y), **hp)[0])(jnp.asarray(x))
  if spread:
    assert kept < len(y), "the clustered case must leave anchors without mined pairs"
  np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("recipe", ["cub_obdsd.py", "cars_obdsd.py", "sop_obdsd.py"])
def test_obdsd_distillation_equals_authors_code(recipe):
  config = config_lib.load_config(f"configs/{recipe}")
  name, hp = _hparams(dict(config.terms.obd_sd, name="obd_sd"))
  x, y = _clustered(2, 48, 32, 0.8)
  t = x + 0.3 * np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
  progress = 37 / 150
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  ref = obdsd_distillation(F.normalize(xt, dim=1), F.normalize(torch.tensor(t, dtype=torch.float64), dim=1),
                           lambda_=hp["lambda_"], omega=hp["omega"], tau_d=hp["tau_d"],
                           progress=progress, tau=hp["tau"])
  ref.backward()
  value, grad = jax.value_and_grad(lambda e: losses.get(name)(
      embeddings=e, teacher_embeddings=jnp.asarray(t), progress=progress, **hp)[0])(jnp.asarray(x))
  # Cars' omega 0.99 makes I - omega W ill-conditioned: float32 solve vs inverse.
  np.testing.assert_allclose(value, ref.item(), rtol=2e-4)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2e-3, atol=1e-5 * np.abs(xt.grad.numpy()).max())


def raml_reference(s, t, lambda1, lambda2, eps=1e-6):
  """s, t: [images, views, dim], unit rows."""
  def offdiag_mse(a, b):
    sq = ((a - b + eps) ** 2).sum(0).fill_diagonal_(0)
    return sq.sum() / (a.shape[1] * (a.shape[2] - 1))
  tt = t @ t.transpose(1, 2)
  absolute = ((1 - (s * t).sum(-1) + eps) ** 2).mean(-1).sum()
  return (absolute + lambda1 * offdiag_mse(s @ t.transpose(1, 2), tt)
          + lambda2 * offdiag_mse(s @ s.transpose(1, 2), tt))


@pytest.mark.parametrize("recipe", ["cub_raml.py", "cars_raml.py", "sop_raml.py"])
def test_raml_loss_equals_authors_code(recipe):
  config = config_lib.load_config(f"configs/{recipe}")
  name, hp = _hparams(dict(config.terms.raml, name="raml"))
  images, views, dim = config.batch_size, hp["views_per_image"], 64
  rng = np.random.default_rng(0)
  teacher = np.repeat(rng.normal(size=(images, dim)), views, 0) + 0.7 * rng.normal(size=(images * views, dim))
  student = (teacher + 0.5 * rng.normal(size=teacher.shape)).astype(np.float32)
  teacher = teacher.astype(np.float32)
  xt = torch.tensor(student, dtype=torch.float64, requires_grad=True)
  unit = lambda a: F.normalize(a, dim=1).reshape(images, views, dim)
  ref = raml_reference(unit(xt), unit(torch.tensor(teacher, dtype=torch.float64)),
                       hp["lambda1"], hp["lambda2"])
  ref.backward()
  value, grad = jax.value_and_grad(lambda e: losses.get(name)(
      embeddings=e, teacher_embeddings=jnp.asarray(teacher), **hp)[0])(jnp.asarray(student))
  # jaxdml leaves out the reference's eps = 1e-6 inside each square.
  np.testing.assert_allclose(value, ref.item(), rtol=1e-4)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-3, atol=1e-4 * np.abs(xt.grad.numpy()).max())
