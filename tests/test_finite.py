import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_instance

from robust_gate import finite, objectives, reference, uncertainty
from robust_gate.checks import InputError

CASES = [
  (K, N, perturbed, set_kind)
  for K, N in [(2, 8), (2, 64), (3, 20), (3, 64), (5, 8), (5, 64)]
  for perturbed in (False, True)
  for set_kind in ("simplex", "box")
]


def _set(kind, K):
  if kind == "simplex":
    return uncertainty.simplex(K)
  return uncertainty.box(np.full(K, 0.5 / K), np.full(K, 2.0 / K))


def _exact(D, logE, lam_set, baseline="entropy"):
  b = objectives.finite_baselines(
    baseline, jnp.asarray(D, jnp.float32), jnp.asarray(logE, jnp.float32)
  )
  return reference.solve_exact(D, logE, np.asarray(b, np.float64), lam_set)


def _assert_normalized(sol, logE):
  assert np.all(sol.model_probs >= 0)
  assert abs(sol.model_probs.sum() - 1.0) < 1e-6
  # The gate is in G_1: Σ_j E_{x~p_j}[g(x, j)] = 1, and p_g = Σ_j g(x, j) p_j(x).
  assert abs(np.sum(np.exp(logE).T * sol.gate) - 1.0) < 1e-6
  np.testing.assert_allclose(np.sum(np.exp(logE).T * sol.gate, axis=1), sol.model_probs, atol=1e-9)


@pytest.mark.parametrize("K, N, perturbed, set_kind", CASES)
def test_game_reaches_the_exact_minimax_value(K, N, perturbed, set_kind):
  rng = np.random.default_rng(1000 * K + N + 7 * perturbed)
  D, logE = random_instance(rng, K, N, perturbed=perturbed)
  lam_set = _set(set_kind, K)
  sol = finite.solve(D, logE, uncertainty=lam_set)
  exact = _exact(D, logE, lam_set)
  _assert_normalized(sol, logE)
  # A normalized model cannot beat the minimax value; the game gets within 1%.
  assert sol.worst_case >= exact.value - 1e-4
  assert sol.worst_case <= 1.01 * exact.value, (sol.worst_case, exact.value)
  assert lam_set.contains(sol.lam_avg) and lam_set.contains(sol.lam_last)
  np.testing.assert_allclose(
    sol.worst_case, np.max(lam_set.vertices() @ sol.domain_loss), rtol=1e-5
  )
  # KL(D_λ ‖ p) is convex in λ and the linearization bounds it (docs/math.md §3).
  assert sol.mixture_worst_case <= sol.worst_case + 1e-6
  if set_kind == "simplex":  # vertices of Δ_K are the domains themselves
    # Both are computed in float64 from the same final gate (finite._report), so
    # they agree far beyond float32 rounding.
    np.testing.assert_allclose(sol.mixture_worst_case, sol.worst_case, rtol=1e-6)


@pytest.mark.parametrize("K, N, perturbed", [(3, 20, True), (5, 64, False)])
def test_lambda_bar_is_nearly_least_favorable(K, N, perturbed):
  """The duality gap of (final gate, λ̄): U(w) − min_p Σ λ̄_k L_k(p) is small."""
  rng = np.random.default_rng(K + N)
  D, logE = random_instance(rng, K, N, perturbed=perturbed)
  sol = finite.solve(D, logE)
  lam = sol.lam_avg / sol.lam_avg.sum()
  lower = _exact(D, logE, uncertainty.box(lam, lam)).value
  exact = _exact(D, logE, uncertainty.simplex(K)).value
  assert lower <= exact + 1e-5
  assert sol.worst_case - lower <= 0.02 * exact


def test_kl_ball_and_other_baselines():
  rng = np.random.default_rng(5)
  D, logE = random_instance(rng, 3, 24, perturbed=True)
  ball = uncertainty.kl_ball([0.5, 0.3, 0.2], 0.1)
  for baseline in ("entropy", "expert", "none"):
    sol = finite.solve(D, logE, uncertainty=ball, baseline=baseline)
    exact = _exact(D, logE, ball, baseline)
    assert exact.value - 1e-4 <= sol.worst_case <= exact.value + 0.01 * abs(exact.value)
    assert ball.contains(sol.lam_avg, atol=1e-4)
  # On a KL ball the mixture objective is a lower bound of the linearized one.
  assert 0 < sol.mixture_worst_case <= np.max(sol.domain_kl) + 1e-9


def test_stochastic_minibatches_and_the_network_gate():
  rng = np.random.default_rng(11)
  D, logE = random_instance(rng, 3, 32, perturbed=True)
  exact = _exact(D, logE, uncertainty.simplex(3)).value
  sol = finite.solve(D, logE, batch_size=32, steps=5000, primal_lr=0.03, ema_decay=0.999)
  _assert_normalized(sol, logE)
  assert exact - 1e-4 <= sol.worst_case <= 1.02 * exact
  sol = finite.solve(D, logE, gate="mlp")
  _assert_normalized(sol, logE)
  # The network family is a subset of the tabular one: never below the optimum.
  assert exact - 1e-4 <= sol.worst_case <= 1.1 * exact


def test_experts_without_mass_somewhere_are_handled():
  """-inf expert log-probs, and a point no expert (and no domain) covers."""
  D = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0]])
  with np.errstate(divide="ignore"):
    logE = np.log(np.array([[0.6, 0.4, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]]))
  sol = finite.solve(D, logE, steps=2000)
  _assert_normalized(sol, logE)
  assert sol.model_probs[3] == 0.0 and np.all(np.isfinite(sol.domain_kl))
  exact = _exact(D, logE, uncertainty.simplex(2))
  assert exact.value - 1e-4 <= sol.worst_case <= 1.01 * exact.value


def test_same_seed_same_result():
  D, logE = random_instance(np.random.default_rng(2), 3, 16, perturbed=True)
  a = finite.solve(D, logE, steps=300, batch_size=8, seed=4)
  b = finite.solve(D, logE, steps=300, batch_size=8, seed=4)
  np.testing.assert_array_equal(a.model_probs, b.model_probs)
  np.testing.assert_array_equal(a.lam_avg, b.lam_avg)


GOOD_D = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
GOOD_E = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))


@pytest.mark.parametrize(
  "D, logE, kwargs, match",
  [
    (np.array([[0.5, 0.5], [0.2, 0.8]]), GOOD_E, {}, "N=2 points but expert_logprobs has N=3"),
    (GOOD_D[:0], GOOD_E, {}, "empty"),
    (GOOD_D, GOOD_E[:0], {}, "empty"),
    (GOOD_D[0], GOOD_E, {}, "2 dimensions"),
    (GOOD_D * 1.1, GOOD_E, {}, "sums to 1.1"),
    (-GOOD_D, GOOD_E, {}, "negative"),
    (np.where(GOOD_D == 0.0, np.nan, GOOD_D), GOOD_E, {}, "NaN or infinite"),
    (GOOD_D, np.where(GOOD_E > -1, np.nan, GOOD_E), {}, r"\[0, 0\] is NaN"),
    (GOOD_D, np.where(GOOD_E > -1, np.inf, GOOD_E), {}, r"\+inf"),
    (GOOD_D, GOOD_E + 0.1, {}, "experts must be normalized"),
    (
      GOOD_D,
      np.log([[0.5, 0.5, 1e-300], [0.5, 0.5, 1e-300]]) - np.array([0, 0, np.inf]),
      {},
      "point 2 has mass 0.8 under domain 1 but every expert",
    ),
    (GOOD_D, GOOD_E, {"uncertainty": uncertainty.simplex(3)}, "over 3 domains"),
    (GOOD_D, GOOD_E, {"gate": "transformer"}, "unknown gate"),
    (GOOD_D, GOOD_E, {"steps": 0}, "steps=0 must be positive"),
    (GOOD_D, GOOD_E, {"primal_lr": float("nan")}, "primal_lr=nan must be finite and > 0"),
    (GOOD_D, GOOD_E, {"dual_lr": -1.0}, "dual_lr=-1.0 must be finite and ≥ 0"),
    (GOOD_D, GOOD_E, {"batch_size": 0}, "batch_size=0 must be positive"),
    (GOOD_D, GOOD_E, {"baseline": "oracle"}, "unknown baseline"),
  ],
)
def test_bad_input_is_a_clear_error(D, logE, kwargs, match):
  with np.errstate(divide="ignore"), pytest.raises(InputError, match=match):
    finite.solve(D, logE, **kwargs)
