import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import certificate, finite, objectives, reference, uncertainty
from robust_gate.checks import InputError


def _ce(probs_KxN, p_N):
  pos = probs_KxN > 0
  return -np.sum(np.where(pos, probs_KxN * np.log(np.where(pos, p_N, 1.0)), 0.0), axis=1)


def test_duality_gap_is_upper_minus_lower():
  losses = jnp.array([0.3, 0.9, 0.5])
  best = jnp.array([0.4, 0.6, 0.3])
  lam_bar = jnp.array([0.2, 0.5, 0.3])
  box = uncertainty.box([0.2, 0.0, 0.2], [1.0, 0.5, 1.0])
  c = jax.jit(certificate.duality_gap)(losses, best, lam_bar, box)
  np.testing.assert_allclose(c.upper, 0.2 * 0.3 + 0.5 * 0.9 + 0.3 * 0.5, rtol=F32_RTOL)
  np.testing.assert_allclose(c.lam_worst_K, [0.2, 0.5, 0.3], rtol=F32_RTOL)
  np.testing.assert_allclose(c.lower, 0.2 * 0.4 + 0.5 * 0.6 + 0.3 * 0.3, rtol=F32_RTOL)
  np.testing.assert_allclose(c.gap, c.upper - c.lower, rtol=F32_RTOL)
  assert c.lower_is_estimate


def test_a_worse_best_response_falls_back_on_the_gate_itself():
  """ĝ is in the family too: the lower value is at most λ̄·L(ĝ), so the gap is ≥ 0."""
  losses = jnp.array([0.3, 0.9, 0.5])
  lam_bar = jnp.array([0.0, 1.0, 0.0])
  c = certificate.duality_gap(losses, losses + 1.0, lam_bar, uncertainty.simplex(3))
  np.testing.assert_allclose([c.upper, c.lower, c.gap], [0.9, 0.9, 0.0], atol=1e-7)


@pytest.mark.parametrize("seed, perturbed", [(0, False), (1, True), (2, True), (3, False)])
def test_finite_best_response_is_the_exact_optimum(seed, perturbed):
  """Against the independent convex solver over Λ = {λ} (a degenerate box)."""
  D, logE = finite.random_instance(seed, 3, 20, perturbed=perturbed)
  lam = np.random.default_rng(seed).dirichlet(np.ones(3))
  p = certificate.finite_best_response(D, logE, lam)
  lo, hi = np.exp(logE).min(axis=0), np.exp(logE).max(axis=0)
  assert abs(p.sum() - 1.0) < 1e-12 and np.all(p >= 0) and np.all(p[hi == 0] == 0)
  # Some τ has τ·min_j p_j ≤ p ≤ τ·max_j p_j: max p/hi ≤ min p/lo.
  tau_min = np.max(p[hi > 0] / hi[hi > 0])
  assert np.all(tau_min * lo <= p * (1 + 1e-12))
  exact = reference.solve_exact(D, logE, np.zeros(3), uncertainty.box(lam, lam))
  value = lam @ _ce(D, p)
  # Ours is feasible and no worse than the solver's point; the solver's reported
  # value is accurate to its tolerance (~1e-6).
  assert value <= lam @ _ce(D, exact.model_probs) + 1e-12
  np.testing.assert_allclose(value, exact.value, atol=1e-5)


def test_with_exact_experts_the_lower_value_is_the_jensen_shannon_divergence():
  """Experts = domains: D_λ is in the family, so min_p Σ λ_k KL(D_k ‖ p) = JSD_λ (§3)."""
  D, logE = finite.random_instance(4, 4, 16)
  lam = np.array([0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(certificate.finite_best_response(D, logE, lam), lam @ D, atol=1e-12)
  H = finite.entropy_np(D)
  c = certificate.finite_duality_gap(D, logE, H, _ce(D, lam @ D) - H, lam, uncertainty.simplex(4))
  jsd = objectives.jsd(jnp.asarray(lam, jnp.float32), jnp.asarray(D, jnp.float32))
  np.testing.assert_allclose(c.lower, jsd, rtol=F32_RTOL)
  assert not c.lower_is_estimate


def _set(kind, K):
  if kind == "simplex":
    return uncertainty.simplex(K)
  if kind == "box":
    return uncertainty.box(np.full(K, 0.5 / K), np.full(K, 2.0 / K))
  return uncertainty.kl_ball(np.full(K, 1.0 / K), 0.1)


@pytest.mark.parametrize(
  "seed, K, N, kind", [(0, 2, 8, "simplex"), (1, 3, 20, "box"), (3, 3, 24, "kl_ball")]
)
def test_weak_duality_brackets_the_exact_minimax(seed, K, N, kind):
  """lower ≤ minimax ≤ upper for a short run (gap > 0) and a long one (gap small)."""
  D, logE = finite.random_instance(seed, K, N, perturbed=seed % 2 == 0)
  lam_set, b = _set(kind, K), finite.entropy_np(D)
  exact = reference.solve_exact(D, logE, b, lam_set).value
  gaps = []
  for steps in (20, 2000):
    sol = finite.solve(D, logE, uncertainty=lam_set, steps=steps)
    c = certificate.finite_duality_gap(D, logE, b, sol.domain_loss, sol.lam_avg, lam_set)
    # 1e-5: the reference solver's accuracy.
    assert c.lower <= exact + 1e-5 and exact <= c.upper + 1e-5, (steps, c, exact)
    np.testing.assert_allclose(c.gap, c.upper - c.lower, rtol=1e-12)
    np.testing.assert_allclose(c.upper, sol.worst_case, rtol=1e-12)
    gaps.append(float(c.gap))
  assert gaps[0] > 0.01 * exact, gaps
  assert gaps[1] < 2e-3 * exact, gaps


@pytest.mark.parametrize(
  "lam, losses, match",
  [
    ([0.5, 0.6], [0.1, 0.2], r"^lam_bar_K must be a point of the simplex"),
    ([0.5, 0.5, 0.0], [0.1, 0.2], r"^lam_bar_K must have shape \(2,\), got \(3,\)\.$"),
    ([0.5, 0.5], [0.1, np.nan], r"^losses_K contains NaN or infinite values"),
  ],
)
def test_bad_input_is_a_clear_error(lam, losses, match):
  D = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
  logE = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
  with pytest.raises(InputError, match=match):
    certificate.finite_duality_gap(D, logE, np.zeros(2), losses, lam, uncertainty.simplex(2))
  with pytest.raises(InputError, match=r"^uncertainty set is over 3 domains but"):
    certificate.finite_duality_gap(D, logE, np.zeros(2), [0.1, 0.2], lam, uncertainty.simplex(3))


def test_lambda_bar_outside_the_set_is_a_clear_error():
  D = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
  logE = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
  box = uncertainty.box([0.3, 0.3], [0.7, 0.7])
  with pytest.raises(InputError, match=r"^lam_bar_K=\[0\.9, 0\.1\] is not a point of the box Λ\.$"):
    certificate.finite_duality_gap(D, logE, np.zeros(2), [0.1, 0.2], [0.9, 0.1], box)
