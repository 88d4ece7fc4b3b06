import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_instance
from tolerances import F32_RTOL

from robust_gate import objectives


@pytest.mark.parametrize("K, N", [(2, 5), (3, 16), (5, 64)])
def test_linearized_equals_mixture_kl_plus_jsd(K, N):
  """Σ_k λ_k KL(D_k ‖ q) = KL(D_λ ‖ q) + JSD_λ(D_1..D_K) (docs/math.md §3)."""
  rng = np.random.default_rng(K * N)
  D, _ = random_instance(rng, K, N)
  probs = jnp.asarray(D, jnp.float32)
  for _ in range(5):
    lam = jnp.asarray(rng.dirichlet(np.ones(K)), jnp.float32)
    logq = jnp.log(jnp.asarray(rng.dirichlet(np.ones(N)), jnp.float32))
    lhs = objectives.linearized_objective(lam, objectives.kl(probs, logq))
    rhs = objectives.mixture_kl(lam, probs, logq) + objectives.jsd(lam, probs)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
    assert objectives.jsd(lam, probs) >= -1e-6


def test_kl_and_entropy_reference_values():
  probs = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
  logq = jnp.log(jnp.array([0.25, 0.25, 0.5]))
  np.testing.assert_allclose(objectives.entropy(probs), [np.log(2), 0.0], atol=1e-7)
  np.testing.assert_allclose(objectives.kl(probs, logq), [np.log(2), np.log(4)], rtol=F32_RTOL)
  np.testing.assert_allclose(objectives.nats_to_bits(np.log(2.0)), 1.0)


def test_zero_mass_points_have_finite_gradients():
  probs = jnp.array([[0.5, 0.5, 0.0]])
  scores = jnp.array([0.0, 1.0, -50.0])
  g = jax.grad(lambda s: objectives.cross_entropy(probs, jax.nn.log_softmax(s))[0])(scores)
  # ∂/∂s of −Σ_x p(x) log softmax(s)_x is softmax(s) − p; the zero-mass point adds 0.
  q = np.exp([0.0, 1.0, -50.0]) / np.exp([0.0, 1.0, -50.0]).sum()
  np.testing.assert_allclose(g, q - np.array([0.5, 0.5, 0.0]), rtol=F32_RTOL, atol=1e-12)


def test_baselines():
  rng = np.random.default_rng(0)
  D, logE = random_instance(rng, 3, 10, perturbed=True)
  probs, logp = jnp.asarray(D, jnp.float32), jnp.asarray(logE, jnp.float32)
  np.testing.assert_allclose(
    objectives.finite_baselines("entropy", probs, logp), objectives.entropy(probs)
  )
  b = objectives.finite_baselines("expert", probs, logp)
  for k in range(3):
    np.testing.assert_allclose(b[k], objectives.cross_entropy(probs[k : k + 1], logp[k])[0])
  np.testing.assert_allclose(objectives.finite_baselines("none", probs, logp), 0.0)
  with pytest.raises(ValueError, match="unknown baseline"):
    objectives.finite_baselines("oracle", probs, logp)
  with pytest.raises(ValueError, match="2 experts for 3 domains"):
    objectives.finite_baselines("expert", probs, logp[:2])


def test_domain_losses_are_explicit_group_means():
  nll = jnp.array([1.0, 3.0, 2.0, 10.0])
  dom = jnp.array([0, 0, 2, 2])
  losses, weight = objectives.domain_losses(
    nll, dom, 3, jnp.array([0.5, 0.0, 1.0]), weight_B=jnp.array([1.0, 1.0, 3.0, 1.0])
  )
  np.testing.assert_allclose(losses, [1.5, 0.0, 3.0])  # (3·2 + 10)/4 − 1 = 3
  np.testing.assert_allclose(weight, [2.0, 0.0, 4.0])  # domain 1 is empty
