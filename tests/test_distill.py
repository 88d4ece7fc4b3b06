import os

import finite_sequences
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from finite_sequences import by_expert, expert_draws, features, outcomes, scored
from tolerances import F32_RTOL

from robust_gate import config_files, data, distill, gating, models, phases, sequence_level, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "launch", "configs")

CFG = models.LMConfig(vocab_size=6, max_len=6, d_model=16, num_layers=1, num_heads=2, d_ff=16)
GATE = models.GateConfig(num_experts=2, vocab_size=6, max_len=6)


def _data():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 6, size=rng.integers(1, 5)) for _ in range(40)]
  return data.encode(seqs, np.arange(40) % 2, ["a", "b"], vocab_size=6, max_len=6)


def test_token_kl_is_the_kl_of_teacher_to_student_at_every_position():
  logp = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6)))
  np.testing.assert_allclose(distill.token_kl(logp, logp), 0.0, atol=1e-6)
  other = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6)))
  p, q = np.asarray(logp, np.float64), np.asarray(other, np.float64)
  want = np.sum(np.exp(p) * (p - q), axis=-1)  # KL(teacher ‖ student), [B, T]
  assert want.shape == (2, 3)
  np.testing.assert_allclose(distill.token_kl(logp, other), want, rtol=F32_RTOL)
  # By hand: KL([1/2, 1/2, 0] ‖ [1/4, 1/2, 1/4]) = ½ ln 2; the teacher's zero-mass
  # token (log-probability -inf) contributes 0, not NaN.
  teacher = jnp.log(jnp.array([[[0.5, 0.5, 0.0]]]))
  student = jnp.log(jnp.array([[[0.25, 0.5, 0.25]]]))
  np.testing.assert_allclose(distill.token_kl(teacher, student), [[0.5 * np.log(2)]], rtol=F32_RTOL)


def test_student_init_takes_the_largest_lambda_expert():
  experts = models.init_stacked_lm(CFG, jax.random.PRNGKey(0), 2)
  student, j = distill.student_init(experts, jnp.array([0.3, 0.7]))
  assert j == 1
  np.testing.assert_array_equal(
    jax.tree_util.tree_leaves(student)[0], jax.tree_util.tree_leaves(experts)[0][1]
  )


def test_student_weights_are_uniform_or_the_renormalized_lambda_bar():
  lam_bar = jnp.array([0.2, 0.6, 0.4])  # λ̄ as a game averages it: not exactly on Δ
  uniform = distill.student_weights("uniform", lam_bar)
  np.testing.assert_allclose(uniform, [1 / 3] * 3, rtol=F32_RTOL)
  np.testing.assert_allclose(
    distill.student_weights("lam_bar", lam_bar), [1 / 6, 1 / 2, 1 / 3], rtol=F32_RTOL
  )
  with pytest.raises(ValueError, match="unknown distillation weights 'lambda'"):
    distill.student_weights("lambda", lam_bar)


def test_a_student_spec_leaves_out_the_weights_every_older_run_had():
  """Workdirs written before config.distill.weights existed were distilled with λ̄:
  at "lam_bar" the spec has no such key, so their student loads; at "uniform" it
  differs from theirs, so the student's spec check refuses it (a clear InputError)."""
  config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
  assert config.distill.weights == "uniform"
  assert phases._section(config, "distill")["weights"] == "uniform"
  config.distill.weights = "lam_bar"
  section = phases._section(config, "distill")
  assert "weights" not in section and "steps" not in section
  assert section == {"lr": config.distill.lr, "per_domain": config.distill.per_domain}


def test_distillation_reduces_the_kl_to_the_teacher():
  d = _data()
  experts = models.init_stacked_lm(CFG, jax.random.PRNGKey(0), 2)
  gate = models.init_gate(GATE, jax.random.PRNGKey(1))
  student = models.init_lm(CFG, jax.random.PRNGKey(2))
  loss_fn = distill.distill_loss_fn(CFG, experts, GATE, gate, d, per_domain=8)
  step, state = train.make_game(
    loss_fn, student, num_domains=2, lr=1e-2, dual_lr=0.0, seed=0, lam_K=jnp.array([0.25, 0.75])
  )
  np.testing.assert_allclose(state.lam_K, [0.25, 0.75], rtol=F32_RTOL)
  state, hist = train.fit(step, state, 200, name="distill", log=lambda s: None)
  np.testing.assert_allclose(hist["lam"], np.tile([0.25, 0.75], (200, 1)), rtol=1e-5)
  assert np.all(hist["losses"][-20:].mean(0) < 0.5 * hist["losses"][:20].mean(0))
  assert np.all(hist["losses"] >= -1e-6)  # a KL


def _finite_sequence_space(V=3, L=3, M=2, seed=0):
  """All V^L sequences and M random autoregressive experts with exact conditionals."""
  import itertools

  rng = np.random.default_rng(seed)
  seqs = np.array(list(itertools.product(range(V), repeat=L)), np.int32)
  # Expert j's conditional at (x_<t) from a random table keyed by the prefix.
  tables = {}
  cond = np.zeros((len(seqs), L, M, V))
  for n, s in enumerate(seqs):
    for t in range(L):
      for j in range(M):
        key = (j, tuple(s[:t]))
        if key not in tables:
          tables[key] = np.log(rng.dirichlet(np.full(V, 0.5)))
        cond[n, t, j] = tables[key]
  observed = np.take_along_axis(cond, seqs[:, :, None, None], -1)[..., 0]  # [N, L, M]
  return jnp.asarray(seqs), jnp.asarray(cond, jnp.float32), observed.sum(1)  # log p_j(x)


def test_sequence_gate_distills_exactly_when_a_causal_gate_exists():
  """Constant sequence gate λ gives D_λ, which the causal posterior gate reproduces."""
  seqs, cond, logp_NxM = _finite_sequence_space()
  lam = np.array([0.3, 0.7])
  target = jax.nn.logsumexp(jnp.log(lam)[None] + logp_NxM, axis=-1)
  np.testing.assert_allclose(jnp.exp(target).sum(), 1.0, atol=1e-5)
  log_gate, kl = distill.sequence_gate_to_causal(target, seqs, cond, steps=3000)
  assert float(kl) < 1e-4
  np.testing.assert_allclose(jnp.exp(log_gate).sum(-1), 1.0, atol=1e-5)


def test_sequence_gate_distillation_reduces_the_kl():
  from robust_gate import gating

  seqs, cond, logp_NxM = _finite_sequence_space(seed=1)
  scores = jax.random.normal(jax.random.PRNGKey(0), logp_NxM.shape) * 2.0
  log_gate = jax.nn.log_softmax(scores, axis=-1)
  target = gating.finite_sequence_logp(log_gate, logp_NxM.T)  # exact Z_w
  np.testing.assert_allclose(jnp.exp(target).sum(), 1.0, atol=1e-5)
  _, kl0 = distill.sequence_gate_to_causal(target, seqs, cond, steps=1)
  causal_log_gate, kl = distill.sequence_gate_to_causal(target, seqs, cond, steps=2000)
  assert 0 <= float(kl) < 0.5 * float(kl0)
  # The distilled causal model is normalized over all V^L sequences.
  observed = jnp.take_along_axis(cond, seqs[:, :, None, None], -1)[..., 0]
  log_q = jax.nn.logsumexp(causal_log_gate + observed, axis=-1).sum(-1)
  np.testing.assert_allclose(jnp.exp(log_q).sum(), 1.0, atol=1e-5)


def test_importance_weights_turn_expert_draws_into_the_sequence_model():
  """On every outcome of the finite space, w · q ∝ p_w exactly (q: the pooled experts);
  on draws, the weighted frequencies approach p_w and the weights, bounded by M/Z_w,
  keep an effective sample size of at least about N · Z_w / M."""
  M = finite_sequences.M
  cfg = sequence_level.SequenceGateConfig(num_experts=M, max_len=finite_sequences.T, hidden=8)
  params = jax.tree_util.tree_map(
    lambda a: a + jax.random.normal(jax.random.PRNGKey(1), jnp.shape(a)),
    sequence_level.init_gate(cfg, jax.random.PRNGKey(0)),
  )
  every = features(outcomes())
  log_gate = sequence_level.log_weights(cfg, params, every)
  log_z = gating.exact_log_normalizer(log_gate, every.loglik_NxM.T)
  p_N = np.exp(np.asarray(sequence_level.sequence_logp(cfg, params, every, log_z), np.float64))
  q_N = np.exp(np.asarray(every.loglik_NxM, np.float64)).mean(1)
  w_N = np.exp(np.asarray(distill.importance_log_weights(log_gate, every.loglik_NxM), np.float64))
  np.testing.assert_allclose(w_N * q_N / np.sum(w_N * q_N), p_N, rtol=1e-5, atol=1e-9)

  draws = expert_draws(4000, seed=0)
  f = features(draws)
  log_w = distill.importance_log_weights(sequence_level.log_weights(cfg, params, f), f.loglik_NxM)
  # Each draw's outcome: its index among `outcomes()` (targets and mask are the outcome).
  keys = {
    (tuple(t), tuple(m)): i
    for i, (t, m) in enumerate(zip(outcomes().targets_NxT, outcomes().mask_NxT))
  }
  idx = [keys[(tuple(t), tuple(m))] for t, m in zip(draws.targets_NxT, draws.mask_NxT)]
  freq = np.bincount(idx, np.exp(np.asarray(log_w, np.float64)), len(p_N))
  assert 0.5 * np.abs(freq - p_N).sum() < 0.03  # total variation
  z = float(sequence_level.normalizer(cfg, params, by_expert(f)).z)
  assert distill.effective_sample_size(log_w) > 0.9 * len(idx) * z / M


def test_a_causal_gate_fitted_to_resampled_draws_matches_a_constant_sequence_gate():
  """The constant sequence gate λ is D_λ = Σ_j λ_j p_j, which the causal posterior gate with
  prior λ reproduces (docs/math.md §2.3): fitted to importance-resampled expert draws, the
  causal gate network approaches it from the uniform mixture it starts at."""
  M, T, V = finite_sequences.M, finite_sequences.T, finite_sequences.V
  lam = np.array([0.8, 0.2])
  draws = expert_draws(2000, seed=0)
  f = features(draws)
  log_gate = jnp.broadcast_to(jnp.log(jnp.asarray(lam, jnp.float32)), f.loglik_NxM.shape)
  log_w = distill.importance_log_weights(log_gate, f.loglik_NxM)
  cfg = models.GateConfig(num_experts=M, vocab_size=V, max_len=T)
  cache = scored(draws.targets_NxT, draws.mask_NxT)
  loss_fn = distill.causal_on_samples_loss_fn(cfg, draws, cache, log_w, 64)
  params = models.init_gate(cfg, jax.random.PRNGKey(0))
  step, state = train.make_game(loss_fn, params, num_domains=1, lr=3e-2, dual_lr=0.0, seed=0)
  every = outcomes()
  p_N = np.exp(np.asarray(features(every).loglik_NxM, np.float64)) @ lam

  def kl(p):  # KL(D_λ ‖ causal model) over every outcome, exact
    cache_all = scored(every.targets_NxT, every.mask_NxT)
    log_q = train.gated_logprobs(cfg, p, every.inputs_NxT, cache_all, every.mask_NxT).sum(1)
    return float(np.sum(p_N * (np.log(p_N) - np.asarray(log_q, np.float64))))

  state, hist = train.fit(step, state, 200, name="distill", log=lambda s: None)
  assert hist["losses"].shape == (200, 1)
  assert kl(state.params) < 0.1 * kl(params)
  first = models.gate_log_weights(
    cfg, state.params, jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T, M))
  )
  np.testing.assert_allclose(np.exp(first[0, 0]), lam, atol=0.06)  # π(∅) = λ
