import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import data, distill, models, train

CFG = models.LMConfig(vocab_size=6, max_len=6, d_model=16, num_layers=1, num_heads=2, d_ff=16)
GATE = models.GateConfig(num_experts=2, vocab_size=6, max_len=6)


def _data():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 6, size=rng.integers(1, 5)) for _ in range(40)]
  return data.encode(seqs, np.arange(40) % 2, ["a", "b"], vocab_size=6, max_len=6)


def test_token_kl_is_zero_for_identical_and_positive_otherwise():
  logp = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 6)))
  np.testing.assert_allclose(distill.token_kl(logp, logp), 0.0, atol=1e-6)
  other = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6)))
  assert np.all(np.asarray(distill.token_kl(logp, other)) > 0)


def test_student_init_takes_the_largest_lambda_expert():
  experts = models.init_stacked_lm(CFG, jax.random.PRNGKey(0), 2)
  student, j = distill.student_init(experts, jnp.array([0.3, 0.7]))
  assert j == 1
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(student)[0],
                                jax.tree_util.tree_leaves(experts)[0][1])


def test_distillation_reduces_the_kl_to_the_teacher():
  d = _data()
  experts = models.init_stacked_lm(CFG, jax.random.PRNGKey(0), 2)
  gate = models.init_gate(GATE, jax.random.PRNGKey(1))
  student = models.init_lm(CFG, jax.random.PRNGKey(2))
  loss_fn = distill.distill_loss_fn(CFG, experts, GATE, gate, d, per_domain=8)
  step, state = train.make_game(loss_fn, student, num_domains=2, lr=1e-2, dual_lr=0.0,
                                seed=0, lam_K=jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(state.lam_K, [0.25, 0.75], rtol=1e-6)
  state, hist = train.fit(step, state, 200, name="distill", log=lambda s: None)
  np.testing.assert_allclose(hist["lam"], np.tile([0.25, 0.75], (200, 1)), rtol=1e-5)
  assert np.all(hist["losses"][-20:].mean(0) < 0.5 * hist["losses"][:20].mean(0))
  assert np.all(hist["losses"] >= -1e-6)  # a KL
