import jax
import jax.numpy as jnp
import numpy as np
from tolerances import F32_RTOL

from robust_gate import data, distill, models, train

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
