"""Sequence-level gates on sequences (robust_gate.sequence_level, docs/math.md §2.2), on a
space small enough to enumerate: every way of drawing T targets that stops at EOS."""

import jax
import jax.numpy as jnp
import numpy as np
from finite_sequences import M, T, V, by_expert, expert_draws, features, outcomes, scored
from tolerances import F32_RTOL

from robust_gate import data, gating, sequence_level

CFG = sequence_level.SequenceGateConfig(num_experts=M, max_len=T, hidden=8)
# The library's functions jitted whole (run op by op, a test compiles hundreds of programs).
_features = jax.jit(sequence_level.features)
_log_weights = jax.jit(lambda params, f: sequence_level.log_weights(CFG, params, f))
_normalizer = jax.jit(lambda params, samples: sequence_level.normalizer(CFG, params, samples))
_sequence_logp = jax.jit(lambda params, f, z: sequence_level.sequence_logp(CFG, params, f, z))
_init_gate = jax.jit(lambda key: sequence_level.init_gate(CFG, key))


def _outcomes():
  """(targets_NxT, mask_NxT, cache_NxTxM) of every outcome of a draw."""
  d = outcomes()
  return d.targets_NxT, d.mask_NxT, scored(d.targets_NxT, d.mask_NxT)


def _params(scale=1.0):
  """Gate parameters away from the constant gate (whose Z is 1)."""
  params = _init_gate(jax.random.PRNGKey(0))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = [x + scale * jax.random.normal(k, jnp.shape(x)) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, noisy)


@jax.jit
def _exact_log_z(params, f):
  log_gate_NxM = sequence_level.log_weights(CFG, params, f)
  return gating.exact_log_normalizer(log_gate_NxM, f.loglik_NxM.T)


def test_the_outcomes_are_every_draw():
  targets, mask, cache = _outcomes()
  f = _features(cache, mask, targets)
  np.testing.assert_allclose(np.exp(np.asarray(f.loglik_NxM, np.float64)).sum(0), 1.0, rtol=1e-6)
  assert (~np.asarray(f.complete_N)).sum() == 2**T  # the draws that never stop
  np.testing.assert_array_equal(f.tokens_N, mask.sum(1))


def test_the_initial_gate_is_the_uniform_mixture_with_z_one():
  targets, mask, cache = _outcomes()
  f = _features(cache, mask, targets)
  params = _init_gate(jax.random.PRNGKey(0))
  np.testing.assert_allclose(_log_weights(params, f), np.log(0.5), atol=1e-7)
  np.testing.assert_allclose(_exact_log_z(params, f), 0.0, atol=1e-6)
  mixture_N = np.log(np.exp(np.asarray(f.loglik_NxM, np.float64)).mean(1))
  logp_N = _sequence_logp(params, f, jnp.float32(0.0))
  np.testing.assert_allclose(logp_N, mixture_N, rtol=F32_RTOL, atol=1e-6)


def test_dividing_by_z_makes_a_distribution_over_every_draw():
  targets, mask, cache = _outcomes()
  f = _features(cache, mask, targets)
  params = _params()
  log_z = _exact_log_z(params, f)
  assert abs(float(log_z)) > 0.05  # unnormalized, the gate is far from G_1
  logp_N = np.asarray(_sequence_logp(params, f, log_z), np.float64)
  np.testing.assert_allclose(np.exp(logp_N).sum(), 1.0, rtol=1e-5)
  # A draw that never stops has the constant gate 1/M.
  w_NxM = np.exp(np.asarray(_log_weights(params, f)))
  np.testing.assert_allclose(w_NxM[~np.asarray(f.complete_N)], 0.5, rtol=F32_RTOL)
  assert np.ptp(w_NxM[np.asarray(f.complete_N), 0]) > 0.05


def _expert_draws(num, seed):
  return by_expert(features(expert_draws(num, seed)))


def test_the_monte_carlo_normalizer_converges_to_the_exact_one():
  targets, mask, cache = _outcomes()
  params = _params()
  z_exact = float(jnp.exp(_exact_log_z(params, _features(cache, mask, targets))))
  errors = []
  for num in (250, 4000):
    est = _normalizer(params, _expert_draws(num, seed=num))
    assert abs(float(est.z) - z_exact) < 4 * float(est.stderr), (est, z_exact)
    errors.append(float(est.stderr))
  np.testing.assert_allclose(errors[1] / errors[0], 0.25, rtol=0.2)  # ∝ 1/√S


def test_the_loss_is_the_normalized_per_token_loss_of_a_batch():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 3, size=rng.integers(1, T)) for _ in range(30)]
  d = data.encode(seqs, np.arange(30) % 2, ["a", "b"], vocab_size=V, max_len=T)
  cache = scored(d.targets_NxT, d.mask_NxT)
  samples, params, b_K = _expert_draws(64, seed=5), _params(), np.array([0.3, -0.1])
  loss_fn = sequence_level.loss_fn(CFG, d, cache, b_K, samples, per_domain=8)
  key = jax.random.PRNGKey(3)
  losses_K = np.asarray(jax.jit(loss_fn)(params, None, key))
  # By hand, in float64: the same batch, Ẑ = Σ_j mean_s g_j(x_js).
  idx_KxB = np.asarray(data.stratified_batch(key, data.domain_index(d), 8))
  w_MxSxM = np.exp(np.asarray(jax.jit(jax.vmap(_log_weights, (None, 0)))(params, samples)))
  z = sum(w_MxSxM[j, :, j].mean() for j in range(M))
  f = _features(cache, d.mask_NxT, d.targets_NxT)
  g_NxM = np.exp(np.asarray(_log_weights(params, f), np.float64))
  nll_N = -np.log((g_NxM * np.exp(np.asarray(f.loglik_NxM, np.float64))).sum(1)) + np.log(z)
  tokens_N = d.mask_NxT.sum(1)
  want = [nll_N[i].sum() / tokens_N[i].sum() - b for i, b in zip(idx_KxB, b_K)]
  np.testing.assert_allclose(losses_K, want, rtol=1e-5)
  # The gradient includes −∇ log Ẑ: the loss minus its data term moves as c · log Ẑ, with
  # c = Σ_k (sequences / tokens of domain k's batch).
  flat = idx_KxB.reshape(-1)
  batch = jax.tree_util.tree_map(lambda a: a[flat], f)

  def data_term(p):
    log_z = jax.lax.stop_gradient(sequence_level.normalizer(CFG, p, samples).log_z)
    nll_KxB = -sequence_level.sequence_logp(CFG, p, batch, log_z).reshape(2, 8)
    return jnp.sum(nll_KxB.sum(1) / batch.tokens_N.reshape(2, 8).sum(1))

  c = sum(8 / tokens_N[i].sum() for i in idx_KxB)
  grad_z = jax.jit(jax.grad(lambda p: sequence_level.normalizer(CFG, p, samples).log_z))(params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad_z)) > 1e-3
  jax.tree_util.tree_map(
    lambda full, part, z: np.testing.assert_allclose(full - part, c * z, rtol=1e-4, atol=1e-6),
    jax.jit(jax.grad(lambda p: loss_fn(p, None, key).sum()))(params),
    jax.jit(jax.grad(data_term))(params),
    grad_z,
  )
