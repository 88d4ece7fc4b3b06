import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import gating, models
from robust_gate.checks import InputError

CFG = models.LMConfig(vocab_size=11, max_len=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)


def _jit(fn, *static):
  """fn jitted whole, its first len(static) arguments bound (configs are static): run op
  by op, each test compiled hundreds of small programs."""
  return jax.jit(lambda *args: fn(*static, *args))


_init_lm = _jit(models.init_lm, CFG)
_init_stacked_lm = jax.jit(lambda key: models.init_stacked_lm(CFG, key, 3))
_next_token_logprobs = _jit(models.next_token_logprobs, CFG)
_stacked_token_logprobs = _jit(models.stacked_token_logprobs, CFG)


def _tokens(key, B=3):
  return jax.random.randint(key, (B, CFG.max_len), 0, CFG.vocab_size)


def test_next_token_distributions_are_normalized_and_causal():
  params = _init_lm(jax.random.PRNGKey(0))
  x = _tokens(jax.random.PRNGKey(1))
  logp = _next_token_logprobs(params, x)
  np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1.0, atol=1e-5)
  # Changing token 5 leaves the distributions at positions < 5 unchanged.
  x2 = x.at[:, 5].set((x[:, 5] + 1) % CFG.vocab_size)
  logp2 = _next_token_logprobs(params, x2)
  np.testing.assert_allclose(logp[:, :5], logp2[:, :5], atol=1e-6)
  assert not np.allclose(logp[:, 5:], logp2[:, 5:])


def _reference_lm(params, x_BxT):
  """The transformer written plainly: gathered embeddings, one [D, 3D] q/k/v product
  sliced, masked softmax attention; the parameter layout of nn.Embed / nn.Dense."""
  p = params["params"]

  def layer_norm(q, h):
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-6) * q["scale"][None, None] + q["bias"][None, None]

  B, T = x_BxT.shape
  H = CFG.num_heads
  h = p["Embed_0"]["embedding"][x_BxT] + p["pos_embedding"][None, :T]
  for i in range(CFG.num_layers):
    q = p[f"_Block_{i}"]
    a = layer_norm(q["LayerNorm_0"], h)
    qkv = (a @ q["Dense_0"]["kernel"]).reshape(B, T, 3, H, -1)
    s = jnp.einsum("bqhk,bthk->bhqt", qkv[:, :, 0], qkv[:, :, 1]) / np.sqrt(qkv.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, None], s, -jnp.inf)
    o = jnp.einsum("bhqt,bthk->bqhk", jax.nn.softmax(s, -1), qkv[:, :, 2])
    h = h + o.reshape(B, T, -1) @ q["Dense_1"]["kernel"]
    a = layer_norm(q["LayerNorm_1"], h)
    a = jax.nn.gelu(a @ q["Dense_3"]["kernel"] + q["Dense_3"]["bias"][None, None])
    h = h + a @ q["Dense_2"]["kernel"] + q["Dense_2"]["bias"][None, None]
  h = layer_norm(p["LayerNorm_0"], h)
  return h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None, None]


def test_transformer_equals_a_plain_reference_in_value_and_gradient():
  """One-hot embedding, q/k/v as three products of one kernel and rematerialized GELU
  (speed, BUILD_NOTES.md) compute the plain transformer on the same parameters."""
  params = _init_lm(jax.random.PRNGKey(0))
  assert params["params"]["_Block_0"]["Dense_0"]["kernel"].shape == (16, 48)
  x = _tokens(jax.random.PRNGKey(1))
  got = jax.jit(models.TransformerLM(CFG).apply)(params, x)
  np.testing.assert_allclose(got, jax.jit(_reference_lm)(params, x), atol=1e-5)
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p)))
  g = jax.jit(jax.grad(loss(lambda p: models.TransformerLM(CFG).apply(p, x))))(params)
  g_ref = jax.jit(jax.grad(loss(lambda p: _reference_lm(p, x))))(params)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref
  )


def test_stacked_experts_equal_individual_ones():
  params = _init_stacked_lm(jax.random.PRNGKey(0))
  x, y = _tokens(jax.random.PRNGKey(1)), _tokens(jax.random.PRNGKey(2))
  stacked = _stacked_token_logprobs(params, x, y)
  token_logprobs = _jit(models.token_logprobs, CFG)
  for j in range(3):
    one = jax.tree_util.tree_map(lambda a, j=j: a[j], params)
    np.testing.assert_allclose(stacked[..., j], token_logprobs(one, x, y), atol=1e-6)


def test_gated_transformer_experts_are_normalized():
  """The causal gate over real experts: every conditional sums to 1 (G_1)."""
  M = 3
  gate_cfg = models.GateConfig(
    num_experts=M, vocab_size=CFG.vocab_size, max_len=CFG.max_len, token_embed=4
  )

  params = _init_stacked_lm(jax.random.PRNGKey(0))
  x = _tokens(jax.random.PRNGKey(1))
  y = jnp.concatenate([x[:, 1:], jnp.zeros((3, 1), x.dtype)], axis=1)
  logp_BxTxMxV = jnp.stack(
    [
      _next_token_logprobs(jax.tree_util.tree_map(lambda a, j=j: a[j], params), x) for j in range(M)
    ],
    axis=2,
  )
  observed = _stacked_token_logprobs(params, x, y)

  @jax.jit
  def mixture(observed, logp_BxTxMxV):
    gate_params = models.init_gate(gate_cfg, jax.random.PRNGKey(3))
    gate_params = jax.tree_util.tree_map(  # non-trivial gate weights
      lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(4), a.shape), gate_params
    )
    prefix = models.prefix_loglik(observed, jnp.ones(x.shape, bool))
    log_gate = models.gate_log_weights(gate_cfg, gate_params, x, prefix)
    return gating.causal_mixture_next_token(log_gate, logp_BxTxMxV), log_gate

  mix, log_gate = mixture(observed, logp_BxTxMxV)
  np.testing.assert_allclose(jnp.exp(mix).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.exp(log_gate).sum(-1), 1.0, atol=1e-5)


def test_gate_starts_at_the_uniform_prior_posterior_gate():
  M, B, T = 4, 2, 8
  logp = jnp.log(jax.random.uniform(jax.random.PRNGKey(0), (B, T, M), minval=0.05))
  logp = logp.at[0, 2, 1].set(-jnp.inf)  # expert 1 missed a token: weight 0 after it
  mask = jnp.ones((B, T), bool)
  cfg = models.GateConfig(num_experts=M, vocab_size=5, max_len=T)
  params = _jit(models.init_gate, cfg)(jax.random.PRNGKey(1))
  prefix = _jit(models.prefix_loglik)(logp, mask)
  log_gate = _jit(models.gate_log_weights, cfg)(params, jnp.zeros((B, T), jnp.int32), prefix)
  expected = gating.posterior_log_gate(jnp.zeros(M), prefix.reshape(-1, M)).reshape(B, T, M)
  np.testing.assert_allclose(jnp.exp(log_gate), jnp.exp(expected), atol=1e-6)
  assert float(jnp.exp(log_gate[0, 3, 1])) == 0.0

  @jax.jit
  def grad(prefix):
    return jax.grad(
      lambda p: models.gate_log_weights(cfg, p, jnp.zeros((B, T), jnp.int32), prefix)[..., 0].sum()
    )(params)

  # The -inf gives the gradient a vanishing weight gives (e^-1e4 is 0 in float32), not NaN.
  finite_prefix = _jit(models.prefix_loglik)(logp.at[0, 2, 1].set(-1e4), mask)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=F32_RTOL, atol=1e-7),
    grad(prefix),
    grad(finite_prefix),
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"d_model": 10, "num_heads": 3}, "not divisible"),
    ({"num_layers": 0}, "positive int"),
    ({"d_ff": 2.5}, "positive int"),
  ],
)
def test_bad_model_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.LMConfig(vocab_size=5, max_len=4, **kwargs)


def test_bfloat16_compute_keeps_float32_weights_and_normalized_outputs():
  cfg32 = models.LMConfig(vocab_size=11, max_len=9, d_model=32, num_layers=2, num_heads=4, d_ff=64)
  cfg16 = models.LMConfig(**{**dataclasses.asdict(cfg32), "dtype": "bfloat16"})
  params = _jit(models.init_lm, cfg32)(jax.random.PRNGKey(0))
  params16 = jax.eval_shape(lambda: models.init_lm(cfg16, jax.random.PRNGKey(0)))
  assert params16["params"]["Dense_0"]["kernel"].dtype == jnp.float32  # master weights
  x = jax.random.randint(jax.random.PRNGKey(1), (4, 9), 0, 11)
  lp32 = _jit(models.next_token_logprobs, cfg32)(params, x)
  lp16 = _jit(models.next_token_logprobs, cfg16)(params, x)
  assert lp16.dtype == jnp.float32
  np.testing.assert_allclose(jnp.exp(lp16).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(lp16, lp32, atol=0.05)  # bf16 rounding, same model
  with pytest.raises(InputError, match="dtype"):
    models.LMConfig(vocab_size=11, max_len=9, dtype="float16")
