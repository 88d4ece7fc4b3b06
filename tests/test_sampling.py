import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import distill, models, sampling
from robust_gate.checks import InputError

CFG = models.LMConfig(vocab_size=5, max_len=6, d_model=16, num_layers=1, num_heads=2, d_ff=16)
GATE = models.GateConfig(num_experts=3, vocab_size=5, max_len=6)


def _models():
  experts = models.init_stacked_lm(CFG, jax.random.PRNGKey(0), 3)
  gate = models.init_gate(GATE, jax.random.PRNGKey(1))
  gate = jax.tree_util.tree_map(
    lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(2), a.shape), gate
  )
  return experts, gate


def test_adjust_is_normalized():
  logp = jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (4, 7)))
  p64 = np.asarray(logp, np.float64)
  for temperature, top_k in [(1.0, 0), (0.5, 0), (2.0, 3), (1.0, 1)]:
    out = np.asarray(sampling.adjust(logp, temperature, top_k))
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, atol=1e-6)
    # By hand: p^(1/T) renormalized over each row's k most likely tokens.
    keep = np.argsort(-p64, axis=-1)[:, : top_k or 7]
    w = np.zeros_like(p64)
    np.put_along_axis(w, keep, np.exp(np.take_along_axis(p64, keep, -1) / temperature), -1)
    np.testing.assert_array_equal(out > -np.inf, w > 0)
    np.testing.assert_allclose(np.exp(out), w / w.sum(-1, keepdims=True), rtol=F32_RTOL, atol=1e-7)
  np.testing.assert_array_equal((np.asarray(sampling.adjust(logp, 2.0, 3)) > -np.inf).sum(-1), 3)
  np.testing.assert_allclose(sampling.adjust(logp, 1.0, 0), logp, atol=1e-6)
  with pytest.raises(InputError, match=r"^temperature must be > 0, got 0\.0\.$"):
    sampling.adjust(logp, 0.0)
  with pytest.raises(InputError, match=r"^top_k must be in \[0, 7\], got 8\.$"):
    sampling.adjust(logp, 1.0, 8)


@pytest.mark.parametrize("which", ["expert", "gated"])
def test_sampling_is_deterministic_and_well_formed(which):
  experts, gate = _models()
  fn = (
    sampling.lm_next_fn(CFG, jax.tree_util.tree_map(lambda a: a[0], experts))
    if which == "expert"
    else sampling.gated_next_fn(CFG, experts, GATE, gate)
  )
  draw = jax.jit(lambda k: sampling.sample(fn, k, 64, CFG.max_len, temperature=0.9, top_k=4))
  a, ma = draw(jax.random.PRNGKey(3))
  b, mb = draw(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ma, mb)
  assert not np.array_equal(a, draw(jax.random.PRNGKey(4))[0])
  a, ma = np.asarray(a), np.asarray(ma)
  assert np.all(ma[:, 0])
  assert np.all(np.diff(ma.astype(int), axis=1) <= 0)  # mask is a prefix
  assert np.all((a >= 0) & (a < CFG.vocab_size)) and np.all(a[~ma] == 0)
  lengths = ma.sum(1)
  ended = lengths < CFG.max_len
  assert np.all(a[ended, lengths[ended] - 1] == 0)  # an EOS ends each finished one
  assert np.all(a[:, :-1][ma[:, 1:]] != 0)  # no EOS before the end


def test_samples_follow_the_model_distribution():
  """First-token frequencies of the gated model match its distribution."""
  experts, gate = _models()
  fn = sampling.gated_next_fn(CFG, experts, GATE, gate)
  tokens, _ = jax.jit(lambda k: sampling.sample(fn, k, 20000, 2))(jax.random.PRNGKey(0))
  p = np.exp(np.asarray(fn(jnp.zeros((1, 2), jnp.int32))[0, 0]))
  freq = np.bincount(np.asarray(tokens[:, 0]), minlength=CFG.vocab_size) / 20000
  np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 20000).max() + 1e-3)


def test_gated_sampler_and_distillation_teacher_agree():
  """Two code paths to the gated model's next-token distributions give the same numbers."""
  experts, gate = _models()
  x = jax.random.randint(jax.random.PRNGKey(5), (3, CFG.max_len), 1, CFG.vocab_size)
  x = x.at[:, 0].set(0)
  y = jnp.concatenate([x[:, 1:], jnp.zeros((3, 1), x.dtype)], 1)
  teacher = distill.teacher_next_token_logprobs(
    CFG, experts, GATE, gate, x, y, jnp.ones(x.shape, bool)
  )
  np.testing.assert_allclose(
    sampling.gated_next_fn(CFG, experts, GATE, gate)(x), teacher, atol=1e-5
  )
  np.testing.assert_allclose(jnp.exp(teacher).sum(-1), 1.0, atol=1e-5)


def test_expert_samples_are_each_experts_draws_in_the_data_layout():
  experts, _ = _models()
  # Experts that differ: output biases far apart (random initializations are all near uniform).
  bias_MxV = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (3, CFG.vocab_size))
  experts["params"]["Dense_0"]["bias"] = bias_MxV
  names = ("a", "b", "c")
  draw = lambda n, b: sampling.expert_samples(CFG, experts, names, jax.random.PRNGKey(0), n, b)
  d = draw(3000, 1024)  # not a multiple of the batch: the last batch's surplus is dropped
  assert d.inputs_NxT.shape == (9000, CFG.max_len) and d.domains == names
  np.testing.assert_array_equal(d.domain_N, np.repeat([0, 1, 2], 3000))
  np.testing.assert_array_equal(d.inputs_NxT[:, 0], 0)  # BOS, then the targets shifted
  np.testing.assert_array_equal(d.inputs_NxT[:, 1:], d.targets_NxT[:, :-1])
  assert np.all(np.diff(d.mask_NxT.astype(int), axis=1) <= 0) and np.all(d.mask_NxT[:, 0])
  np.testing.assert_array_equal(draw(3000, 1024).targets_NxT, d.targets_NxT)  # deterministic
  # Row block j follows expert j: its first-token frequencies match p_j(x_1).
  p_first: list[np.ndarray] = []
  for j in range(3):
    p = np.exp(
      np.asarray(
        models.next_token_logprobs(CFG, _one(experts, j), jnp.zeros((1, 1), jnp.int32))[0, 0]
      )
    )
    freq = np.bincount(d.targets_NxT[d.domain_N == j, 0], minlength=CFG.vocab_size) / 3000
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 3000).max() + 1e-3)
    p_first.append(p)
  # ... and the experts are told apart: their first-token distributions differ.
  assert min(0.5 * np.abs(p_first[a] - p_first[b]).sum() for a, b in ((0, 1), (0, 2), (1, 2))) > 0.1


def _one(stacked, j):
  return jax.tree_util.tree_map(lambda a: a[j], stacked)


def _rerun_stepper(next_fn) -> sampling.Stepper:
  """`next_fn` as a Stepper whose state is the inputs so far (no cache: each step reruns
  the prefix), to test `sample_cached`'s loop and `mixture_stepper` on any model."""

  def step(inputs_BxT, inputs_B, t):
    inputs_BxT = jax.lax.dynamic_update_slice_in_dim(inputs_BxT, inputs_B[:, None], t, 1)
    return jax.lax.dynamic_index_in_dim(next_fn(inputs_BxT), t, 1, False), inputs_BxT

  return sampling.Stepper(lambda B, T: jnp.zeros((B, T), jnp.int32), step)


def _experts_next_fn(experts):
  """The stacked experts' distributions, [B, T, M, V]."""

  def next_fn(inputs_BxT):
    logp_MxBxTxV = jax.vmap(models.next_token_logprobs, in_axes=(None, 0, None))(
      CFG, experts, inputs_BxT
    )
    return jnp.moveaxis(logp_MxBxTxV, 0, 2)

  return next_fn


@pytest.mark.parametrize("which", ["expert", "gated"])
def test_sampling_with_a_stepper_draws_what_sample_draws(which):
  experts, gate = _models()
  fn = lambda e, g: (
    sampling.lm_next_fn(CFG, _one(e, 0))
    if which == "expert"
    else sampling.gated_next_fn(CFG, e, GATE, g)
  )
  full = jax.jit(lambda e, g, k: sampling.sample(fn(e, g), k, 64, CFG.max_len, 0.9, 4))
  stepped = jax.jit(
    lambda e, g, k: sampling.sample_cached(_rerun_stepper(fn(e, g)), k, 64, CFG.max_len, 0.9, 4)
  )
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    want, got = full(experts, gate, key), stepped(experts, gate, key)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  assert not np.all(want[1])  # some sequences ended: the loop's EOS handling is exercised


def test_the_mixture_stepper_carries_the_gates_inputs_as_the_full_mixture_computes_them():
  """`mixture_stepper` (prefix log-likelihoods as a running sum, the gate rerun on the
  prefix) gives `mixture_next_fn`'s distributions at every position, with a gate that
  reads tokens and positions and whose correction network is not zero."""
  experts, _ = _models()
  gate_cfg = models.GateConfig(num_experts=3, vocab_size=5, max_len=6, token_embed=3)
  gate = models.init_gate(gate_cfg, jax.random.PRNGKey(1))
  gate = jax.tree_util.tree_map(
    lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(2), a.shape), gate
  )
  # Parameters as arguments, not constants of the program (sampling's module docstring).
  next_fn = lambda e, g: sampling.mixture_next_fn(_experts_next_fn(e), gate_cfg, g)
  stepper = lambda e, g: sampling.mixture_stepper(_rerun_stepper(_experts_next_fn(e)), gate_cfg, g)
  x = jax.random.randint(jax.random.PRNGKey(5), (8, CFG.max_len), 0, CFG.vocab_size)
  x = x.at[:, 0].set(0)
  stepped_BxTxV = jax.jit(lambda e, g, x: sampling.step_through(stepper(e, g), x))(experts, gate, x)
  full_BxTxV = jax.jit(lambda e, g, x: next_fn(e, g)(x))(experts, gate, x)
  np.testing.assert_allclose(stepped_BxTxV, full_BxTxV, atol=1e-5)
  full = jax.jit(lambda e, g, k: sampling.sample(next_fn(e, g), k, 64, CFG.max_len))
  stepped = jax.jit(lambda e, g, k: sampling.sample_cached(stepper(e, g), k, 64, CFG.max_len))
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    want, got = full(experts, gate, key), stepped(experts, gate, key)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
