import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, stats
from tolerances import F32_RTOL

from robust_gate import gating


def test_causal_conditionals_sum_to_one():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  B, T, M, V = 3, 5, 4, 7
  logp_BxTxMxV = jax.nn.log_softmax(3 * jax.random.normal(key1, (B, T, M, V)))
  # Some experts give some tokens no mass at all.
  logp_BxTxMxV = logp_BxTxMxV.at[:, :, 0, :3].set(-jnp.inf)
  logp_BxTxMxV = jax.nn.log_softmax(logp_BxTxMxV)
  log_gate_BxTxM = jax.nn.log_softmax(jax.random.normal(key2, (B, T, M)))
  out = gating.causal_mixture_next_token(log_gate_BxTxM, logp_BxTxMxV)
  np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, atol=1e-6)
  # The observed-token form agrees with gathering from the full distribution.
  tokens_BxT = jax.random.randint(key1, (B, T), 0, V)
  logp_BxTxM = jnp.take_along_axis(logp_BxTxMxV, tokens_BxT[:, :, None, None], axis=-1)[..., 0]
  np.testing.assert_allclose(
    gating.causal_mixture_logp(log_gate_BxTxM, logp_BxTxM),
    jnp.take_along_axis(out, tokens_BxT[..., None], axis=-1)[..., 0],
    rtol=1e-5,
  )


def test_minus_inf_expert_logprobs_are_stable():
  logp_BxTxM = jnp.array([[[-jnp.inf, -1.0], [-2.0, -jnp.inf]]])

  def f(scores):
    return gating.causal_mixture_logp(jax.nn.log_softmax(scores), logp_BxTxM).sum()

  value, grad = jax.value_and_grad(f)(jnp.zeros((1, 2, 2)))
  np.testing.assert_allclose(value, np.log(0.5) * 2 - 3.0, rtol=F32_RTOL)
  # d/ds log Σ_j π_j p_j = posterior − π: the live expert's posterior is 1 at each step.
  np.testing.assert_allclose(grad, [[[-0.5, 0.5], [0.5, -0.5]]], rtol=F32_RTOL)


def test_causal_posterior_gate_reproduces_the_mixture():
  """Exact experts over all sequences in {0,1,2}^4; π(x_<t) ∝ λ_j p_j(x_<t)."""
  rng = np.random.default_rng(0)
  V, T, K = 3, 4, 3
  seqs = np.array(np.meshgrid(*[np.arange(V)] * T, indexing="ij")).reshape(T, -1).T
  joint_KxN = rng.dirichlet(np.ones(len(seqs)), size=K)
  lam = np.array([0.2, 0.5, 0.3])
  # Prefix probabilities p_k(x_<t) by marginalizing the joint tables.
  prefix = np.ones((K, len(seqs), T + 1))
  for t in range(1, T + 1):
    for n, s in enumerate(seqs):
      match = np.all(seqs[:, :t] == s[:t], axis=1)
      prefix[:, n, t] = joint_KxN[:, match].sum(axis=1)
  logp_BxTxM = jnp.asarray(
    np.log(prefix[:, :, 1:] / prefix[:, :, :-1]).transpose(1, 2, 0), jnp.float32
  )
  log_prefix_BxTxM = jnp.asarray(np.log(prefix[:, :, :-1]).transpose(1, 2, 0), jnp.float32)
  B = len(seqs)
  log_gate = gating.posterior_log_gate(
    jnp.log(jnp.asarray(lam, jnp.float32)), log_prefix_BxTxM.reshape(B * T, K)
  )
  logp_BxT = gating.causal_mixture_logp(log_gate.reshape(B, T, K), logp_BxTxM)
  np.testing.assert_allclose(np.exp(logp_BxT.sum(-1)), lam @ joint_KxN, rtol=1e-4)


def test_constant_sequence_gate_reproduces_the_mixture():
  """Sequence level, the gate that gives D_λ is g(x, j) = λ_j, not the posterior."""
  rng = np.random.default_rng(0)
  D = rng.dirichlet(np.ones(10), size=3)
  lam = np.array([0.2, 0.5, 0.3])
  log_gate = jnp.broadcast_to(jnp.log(jnp.asarray(lam, jnp.float32)), (10, 3))
  logp = gating.finite_sequence_logp(log_gate, jnp.log(jnp.asarray(D)))
  np.testing.assert_allclose(np.exp(logp), lam @ D, atol=1e-6)


def test_exact_normalizer_makes_a_distribution():
  rng = np.random.default_rng(1)
  logp_MxN = jnp.log(jnp.asarray(rng.dirichlet(np.ones(12), size=4)))
  log_gate_NxM = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(12, 4))))
  log_z = gating.exact_log_normalizer(log_gate_NxM, logp_MxN)
  logp_N = gating.sequence_mixture_logp(log_gate_NxM, logp_MxN.T, log_z)
  np.testing.assert_allclose(jnp.exp(logp_N).sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(logp_N, gating.finite_sequence_logp(log_gate_NxM, logp_MxN), atol=1e-6)
  # Z = Σ_x Σ_j p_j(x) π_j(x), by hand in float64.
  p64, pi64 = np.exp(np.asarray(logp_MxN, np.float64)), np.exp(np.asarray(log_gate_NxM, np.float64))
  np.testing.assert_allclose(np.exp(log_z), np.sum(p64.T * pi64), rtol=F32_RTOL)
  # The gate g = π / Z is in G_1: Σ_j E_{p_j}[g(x, j)] = 1.
  g_NxM = np.exp(np.asarray(log_gate_NxM, np.float64) - float(log_z))
  np.testing.assert_allclose(np.sum(p64.T * g_NxM), 1.0, rtol=F32_RTOL)
  g_NxM = jnp.exp(log_gate_NxM - log_z)
  np.testing.assert_allclose(jnp.sum(jnp.exp(logp_MxN).T * g_NxM), 1.0, atol=1e-6)


# Continuous experts: 1-D Gaussians, a gate linear in x.
MU, SIGMA = np.array([-2.0, 0.5, 3.0]), np.array([1.0, 0.7, 1.5])
PARAMS = {"a": jnp.array([-1.0, 0.3, 0.8]), "b": jnp.array([0.2, -0.1, 0.0])}


def _log_gate(params, x_S):
  return jax.nn.log_softmax(x_S[:, None] * params["a"][None] + params["b"][None], axis=-1)


def _samples(num, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(MU[:, None] + SIGMA[:, None] * rng.normal(size=(3, num)), jnp.float32)


def _z_quadrature(params):
  def integrand(x, j):
    return stats.norm.pdf(x, MU[j], SIGMA[j]) * float(
      jnp.exp(_log_gate(params, jnp.array([x]))[0, j])
    )

  return sum(
    integrate.quad(integrand, -np.inf, np.inf, args=(j,), epsabs=1e-10)[0] for j in range(3)
  )


def test_mc_normalizer_agrees_with_quadrature_within_its_standard_error():
  z_true = _z_quadrature(PARAMS)
  assert abs(z_true - 1.0) > 0.05  # a gate far from G_1 before normalization
  for seed in range(3):
    samples = _samples(4000, seed)
    est = jax.jit(lambda p, s: gating.mc_normalizer(_log_gate, p, s))(PARAMS, samples)
    # By hand: w_js = softmax(a x_js + b)_j; Z = Σ_j mean_s w_js, stderr² = Σ_j Var_j / S.
    x = np.asarray(samples, np.float64)[:, :, None]
    s = x * np.asarray(PARAMS["a"], np.float64) + np.asarray(PARAMS["b"], np.float64)
    pi = np.exp(s - s.max(-1, keepdims=True))
    w_MxS = (pi / pi.sum(-1, keepdims=True))[np.arange(3), :, np.arange(3)]
    np.testing.assert_allclose(est.z, w_MxS.mean(1).sum(), rtol=F32_RTOL)
    np.testing.assert_allclose(
      est.stderr, np.sqrt(w_MxS.var(1, ddof=1).sum() / 4000), rtol=F32_RTOL
    )
    assert abs(float(est.z) - z_true) < 4 * float(est.stderr), (est, z_true)

  # With Z_w, the sequence-level model integrates to 1 (by quadrature).
  def density(x):
    logp = jnp.asarray(stats.norm.logpdf(x, MU, SIGMA), jnp.float32)[None]
    return float(
      jnp.exp(
        gating.sequence_mixture_logp(_log_gate(PARAMS, jnp.array([x])), logp, jnp.log(z_true))
      )[0]
    )

  assert abs(integrate.quad(density, -np.inf, np.inf)[0] - 1.0) < 1e-6


def test_gradient_flows_through_the_normalizer():
  grid = jnp.linspace(-25.0, 25.0, 40001)
  dx = grid[1] - grid[0]
  pdf_MxG = jnp.asarray(
    stats.norm.pdf(np.asarray(grid)[None], MU[:, None], SIGMA[:, None]), jnp.float32
  )

  def z_grid(params):
    return jnp.sum(jnp.exp(_log_gate(params, grid)).T * pdf_MxG) * dx

  g_true = jax.grad(z_grid)(PARAMS)
  samples = _samples(200_000, 7)
  g_mc = jax.grad(lambda p: gating.mc_normalizer(_log_gate, p, samples).z)(PARAMS)
  for name in ("a", "b"):
    assert np.abs(g_true[name]).max() > 0.01
    np.testing.assert_allclose(g_mc[name], g_true[name], atol=5e-3)


def test_log_normalizer_corrects_the_jensen_bias_and_covers_log_z():
  """log Ẑ is biased low (Jensen); log Ẑ + σ²/2 removes the bias to within the noise of
  20000 replicates, and its 95% interval covers log Z at about its level."""
  params = {"a": jnp.array([1.5, -1.0, -0.8]), "b": jnp.array([0.0, 0.5, -0.5])}
  log_z = np.log(_z_quadrature(params))
  R, S = 20000, 10
  rng = np.random.default_rng(0)
  x = jnp.asarray(MU[None, :, None] + SIGMA[None, :, None] * rng.normal(size=(R, 3, S)))
  est = jax.jit(jax.vmap(lambda s: gating.mc_normalizer(_log_gate, params, s)))(x)
  out = [
    gating.log_normalizer(gating.NormalizerEstimate(z, se))
    for z, se in zip(np.asarray(est.z), np.asarray(est.stderr))
  ]
  raw = np.array([o.log_z_uncorrected for o in out])
  corrected = np.array([o.log_z for o in out])
  noise = raw.std() / np.sqrt(R)  # of the mean over replicates
  assert raw.mean() - log_z < -8 * noise  # biased low: a loss divided by Ẑ looks better
  assert abs(corrected.mean() - log_z) < 3 * noise
  stderr = np.array([o.stderr for o in out])
  np.testing.assert_allclose(corrected - raw, stderr**2 / 2, rtol=1e-6)
  covered = np.mean([o.low <= log_z <= o.high for o in out])
  assert 0.9 < covered < 0.97, covered
  one = out[0]
  np.testing.assert_allclose(one.high - one.log_z, 1.959964 * one.stderr, rtol=1e-6)
  np.testing.assert_allclose(one.log_z - one.low, one.high - one.log_z, rtol=1e-9)


def test_shape_and_dtype_checks():
  import pytest

  good = jnp.zeros((2, 3, 4))
  with pytest.raises(AssertionError):
    gating.causal_mixture_logp(good, jnp.zeros((2, 3, 5)))  # M differs
  with pytest.raises(AssertionError):
    gating.causal_mixture_logp(good, jnp.zeros((2, 3, 4), jnp.int32))  # not float
  with pytest.raises(AssertionError):
    gating.exact_log_normalizer(jnp.zeros((5, 3)), jnp.zeros((5, 3)))  # not [M, N]
