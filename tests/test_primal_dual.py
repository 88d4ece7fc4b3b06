import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import random_instance
from tolerances import F32_RTOL

from robust_gate import certificate, dual, finite, gating, objectives, primal_dual, uncertainty


def _game(seed=0, K=3, N=12, dual_lr=0.2, lam_set=None):
  D, logE = random_instance(np.random.default_rng(seed), K, N, perturbed=True)
  probs, logp = jnp.asarray(D, jnp.float32), jnp.asarray(logE, jnp.float32)
  baseline = objectives.entropy(probs)

  def loss_fn(scores, batch, key):
    """Stochastic: 16 samples per domain, so the PRNG stream matters."""
    logp_N = gating.finite_sequence_logp(jax.nn.log_softmax(scores), logp)
    idx = jax.random.categorical(key, jnp.log(probs), shape=(16, K)).T
    shift = 0.0 if batch is None else 1e-3 * batch  # batches reach the loss
    return -jnp.mean(logp_N[idx], axis=1) - baseline + shift

  lam_set = lam_set or uncertainty.simplex(K)
  opt = optax.adam(0.05)
  d = dual.mirror_ascent(dual_lr, lam_set)
  step = primal_dual.make_step(loss_fn, opt, d, ema_decay=0.9)
  state = primal_dual.init_state(jnp.zeros((N, K)), opt, d, jax.random.PRNGKey(seed))
  return step, state, lam_set


def test_scan_equals_the_same_number_of_single_steps():
  step, state, _ = _game()
  batches = jnp.arange(40, dtype=jnp.float32)
  scanned, metrics = primal_dual.run(step, state, 40, batches)
  _, state, _ = _game()
  jit_step = jax.jit(step)
  lams = []
  for t in range(40):
    state, m = jit_step(state, batches[t])
    lams.append(m["lam"])
  for a, b in zip(jax.tree_util.tree_leaves(scanned), jax.tree_util.tree_leaves(state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["lam"], np.stack(lams), rtol=2e-5, atol=1e-7)
  assert int(scanned.step) == 40


def test_ema_is_the_decay_weighted_average_of_the_iterates():
  step, state, _ = _game()  # ema_decay = 0.9
  jit_step = jax.jit(step)
  iterates = []  # w_1 .. w_20; the init w_0 gets no weight (debiased)
  for _ in range(20):
    state, _ = jit_step(state, None)
    iterates.append(np.asarray(state.params, np.float64))
  weights = 0.9 ** np.arange(19, -1, -1)
  ema = np.tensordot(weights / weights.sum(), np.stack(iterates), axes=1)
  np.testing.assert_allclose(state.ema_params, ema, rtol=1e-4, atol=1e-6)
  assert not np.allclose(state.ema_params, state.params, atol=1e-4)  # not the last iterate


def test_lambda_average_and_last_stay_in_the_set():
  box = uncertainty.box([0.1, 0.2, 0.1], [0.5, 0.7, 0.6])
  step, state, _ = _game(lam_set=box, dual_lr=2.0)
  state, metrics = primal_dual.run(step, state, 200)
  assert box.contains(state.lam_K) and box.contains(state.lam_avg_K)
  np.testing.assert_allclose(state.lam_avg_K, np.mean(metrics["lam"], axis=0), atol=1e-5)
  for lam in np.asarray(metrics["lam"]):
    assert box.contains(lam)


def test_zero_dual_step_is_erm():
  step, state, _ = _game(dual_lr=0.0)
  state, metrics = primal_dual.run(step, state, 50)
  np.testing.assert_allclose(metrics["lam"], np.full((50, 3), 1 / 3), rtol=F32_RTOL)
  np.testing.assert_allclose(state.lam_avg_K, np.full(3, 1 / 3), rtol=F32_RTOL)


def test_the_arrays_a_game_starts_from_outlive_its_donated_run():
  """`run` donates the state; the parameters and key it was built from (a trained
  model's, to warm-start from) stay usable."""
  _, _, lam_set = _game()
  params, key = jnp.ones((12, 3)), jax.random.PRNGKey(7)
  opt, d = optax.adam(0.05), dual.mirror_ascent(0.2, lam_set)
  step = primal_dual.make_step(lambda w, batch, k: jnp.sum(w, axis=0), opt, d)
  primal_dual.run(step, primal_dual.init_state(params, opt, d, key), 3)
  np.testing.assert_array_equal(params, np.ones((12, 3)))
  np.testing.assert_array_equal(key, jax.random.PRNGKey(7))


def test_certificate_is_the_max_over_the_set():
  losses = jnp.array([0.3, 0.9, 0.5])
  c = primal_dual.certificate(losses, uncertainty.simplex(3))
  np.testing.assert_allclose(c.upper, 0.9)
  np.testing.assert_allclose(c.lam_worst_K, [0, 1, 0])
  c = primal_dual.certificate(losses, uncertainty.box([0.2, 0.0, 0.2], [1.0, 0.5, 1.0]))
  np.testing.assert_allclose(c.upper, 0.2 * 0.3 + 0.5 * 0.9 + 0.3 * 0.5, rtol=F32_RTOL)


def _exact_game(seed, primal_opt, dual_opt, steps, K=3, N=12):
  """The finite game with exact losses and a tabular gate; returns the certificate of
  (the last gate, `lam`) for lam the last λ and λ̄ (docs/math.md §7)."""
  D, logE = finite.random_instance(seed, K, N, perturbed=True)
  probs, logp = jnp.asarray(D, jnp.float32), jnp.asarray(logE, jnp.float32)
  baseline = objectives.entropy(probs)

  def loss_fn(scores, batch, key):
    del batch, key
    logp_N = gating.finite_sequence_logp(jax.nn.log_softmax(scores), logp)
    return objectives.cross_entropy(probs, logp_N) - baseline

  step = primal_dual.make_step(loss_fn, primal_opt, dual_opt)
  state = primal_dual.init_state(jnp.zeros((N, K)), primal_opt, dual_opt, jax.random.PRNGKey(0))
  state, _ = primal_dual.run(step, state, steps)
  losses = np.asarray(loss_fn(state.params, None, None), np.float64)
  gap = lambda lam: (
    certificate.finite_duality_gap(
      D, logE, finite.entropy_np(D), losses, lam / lam.sum(), uncertainty.simplex(K)
    ).gap
  )
  return gap(np.asarray(state.lam_K, np.float64)), gap(np.asarray(state.lam_avg_K, np.float64))


def test_optimism_makes_the_last_iterate_converge():
  """With large steps, simultaneous descent-ascent's last iterate (w_T, λ_T) orbits the
  saddle point; an optimistic dual step, alone or with an optimistic primal, settles
  it. The gap of the last pair is max_λ F(w_T, λ) − min_w F(w, λ_T), exact."""
  lam_set = uncertainty.simplex(3)
  plain, _ = _exact_game(0, optax.sgd(3.0), dual.mirror_ascent(3.0, lam_set), 1000)
  optimistic_dual, _ = _exact_game(
    0, optax.sgd(3.0), dual.mirror_ascent(3.0, lam_set, optimistic=True), 1000
  )
  both, _ = _exact_game(
    0,
    optax.optimistic_gradient_descent(3.0),
    dual.mirror_ascent(3.0, lam_set, optimistic=True),
    1000,
  )
  assert plain > 0.05, plain
  assert optimistic_dual < 0.05 * plain and both < 0.05 * plain, (plain, optimistic_dual, both)


def test_optimism_on_a_matrix_game():
  """min_x max_λ λᵀAx over two simplices (x = softmax of the scores): a bilinear game
  with an interior equilibrium, where plain descent-ascent cycles away from it."""
  A = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)
  loss_fn = lambda scores, batch, key: A @ jax.nn.softmax(scores)

  def last_gap(primal_opt, optimistic):
    d = dual.mirror_ascent(0.3, uncertainty.simplex(3), optimistic=optimistic)
    step = primal_dual.make_step(loss_fn, primal_opt, d)
    state = primal_dual.init_state(jnp.zeros(3), primal_opt, d, jax.random.PRNGKey(0))
    state, _ = primal_dual.run(step, state, 2000)
    x = jax.nn.softmax(state.params)
    return float(jnp.max(A @ x) - jnp.min(A.T @ state.lam_K))

  plain = last_gap(optax.sgd(2.0), False)
  optimistic = last_gap(optax.optimistic_gradient_descent(2.0), True)
  assert plain > 0.5 and optimistic < 1e-3, (plain, optimistic)


def test_a_decreasing_dual_step_converges():
  """η_t = η/√(1 + t/10): the gap of (w_T, λ̄) shrinks to ~1e-4; at the constant η it
  stalls two orders of magnitude higher."""
  lam_set = uncertainty.simplex(3)
  decaying = dual.mirror_ascent(dual.inverse_sqrt_schedule(3.0, 10.0), lam_set)
  gaps = [_exact_game(1, optax.sgd(3.0), decaying, steps)[1] for steps in (30, 3000)]
  _, constant = _exact_game(1, optax.sgd(3.0), dual.mirror_ascent(3.0, lam_set), 3000)
  assert gaps[0] > 0.02 and gaps[1] < 1e-3 and constant > 0.02, (gaps, constant)


def test_the_dual_ascends_along_its_own_losses_at_the_primal_point():
  """With dual_loss_fn, λ moves along those losses (evaluated at w_t, from a key stream
  of their own), the primal step is the one without it, and both are in the metrics."""
  K = 3
  weights_K = jnp.array([1.0, 2.0, 3.0])
  loss_fn = lambda w, batch, key: w * weights_K + jax.random.uniform(key, (K,))
  dual_loss_fn = lambda w, key: w * weights_K[::-1] + jax.random.uniform(key, (K,))
  opt, d = optax.sgd(0.1), dual.mirror_ascent(0.5, uncertainty.simplex(K))
  state = primal_dual.init_state(jnp.ones(()), opt, d, jax.random.PRNGKey(0))
  held_step = primal_dual.make_step(loss_fn, opt, d, dual_loss_fn=dual_loss_fn)
  held, metrics = jax.jit(held_step)(state, None)
  plain, plain_metrics = jax.jit(primal_dual.make_step(loss_fn, opt, d))(state, None)
  np.testing.assert_array_equal(held.params, plain.params)  # both played λ_0
  np.testing.assert_array_equal(metrics["losses"], plain_metrics["losses"])
  assert "dual_losses" not in plain_metrics
  dual_K = np.asarray(metrics["dual_losses"])
  step_key = jax.random.fold_in(state.key, 0)
  np.testing.assert_allclose(dual_K, dual_loss_fn(state.params, jax.random.fold_in(step_key, 1)))
  assert not np.allclose(dual_K - weights_K[::-1], metrics["losses"] - weights_K)  # own stream
  want_K = jax.nn.softmax(jnp.log(state.lam_K) + 0.5 * dual_K)
  np.testing.assert_allclose(held.lam_K, want_K, rtol=F32_RTOL)
  assert not np.allclose(plain.lam_K, want_K, rtol=1e-3)
