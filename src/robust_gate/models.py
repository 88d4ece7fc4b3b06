"""Expert language models and the causal gate network (Flax), as pure functions.

* `TransformerLM`: a small causal transformer over tokens (bytes, characters,
  pixel intensities). Experts, the monolithic baselines and the distilled student
  share it; K experts are one stacked parameter pytree evaluated with `vmap`.
* `CausalGate`: the gate of docs/math.md §2.1. Its input at position t is the prefix
  x_≤t and the experts' log-likelihoods of the prefix, log p_j(x_<t) (from the
  cache); its logits start as those log-likelihoods, i.e. at the Bayes-posterior
  gate with a uniform prior, and a small MLP learns corrections.

Token layout (robust_gate.data): inputs [BOS, x_1..x_n, pad], targets
[x_1..x_n, EOS, pad], BOS = EOS = 0, a mask over the n + 1 real targets.
"""

import dataclasses
import functools
from typing import Literal, cast

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from robust_gate.checks import InputError

DTYPES = ("float32", "bfloat16")
# "auto": cuDNN flash attention where it applies (GPU, bfloat16), XLA's otherwise.
ATTENTION = ("auto", "xla", "cudnn")
# Fields that choose how, not what, is computed: left out of LMConfig.spec().
_IMPLEMENTATION_FIELDS = ("attention",)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  max_len: int
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 256
  dtype: str = "float32"  # compute dtype; parameters stay float32 (master weights)
  attention: str = "auto"  # one of ATTENTION: the attention kernel, same math

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise InputError(f"LMConfig.dtype must be one of {DTYPES}, got {self.dtype!r}.")
    if self.attention not in ATTENTION:
      raise InputError(f"LMConfig.attention must be one of {ATTENTION}, got {self.attention!r}.")
    for f in dataclasses.fields(self):
      if f.name in ("dtype", "attention"):
        continue
      v = getattr(self, f.name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"LMConfig.{f.name} must be a positive int, got {v!r}.")
    if self.d_model % self.num_heads:
      raise InputError(
        f"LMConfig.d_model={self.d_model} is not divisible by num_heads={self.num_heads}."
      )
    if self.attention == "cudnn" and not _cudnn_supports(self):
      raise InputError(
        "LMConfig.attention='cudnn' needs dtype='bfloat16' and a head width "
        f"(d_model / num_heads) that is a multiple of 8 up to 128, got {self.dtype} and "
        f"{self.d_model // self.num_heads}; use 'auto' or 'xla'."
      )

  def spec(self) -> dict:
    """The fields that fix the model's function, as a workdir's spec.json records them.

    Without `attention`: the kernel choice changes the rounding, not the function
    computed, and spec.json files written before the field existed must still match
    (a differing spec refuses the workdir).
    """
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in _IMPLEMENTATION_FIELDS}


def _attention_implementation(c: LMConfig) -> Literal["xla", "cudnn"]:
  """The kernel `jax.nn.dot_product_attention` runs: c.attention, "auto" resolved.

  "auto" picks cuDNN's flash attention where it supports the shapes and dtype (GPU,
  bfloat16, head width a multiple of 8 up to 128): it is faster there than XLA's
  attention, which materializes the [T, T] scores (BUILD_NOTES.md has the numbers).
  """
  if c.attention == "cudnn" and jax.default_backend() != "gpu":
    raise InputError(
      f"LMConfig.attention='cudnn' needs a GPU; the backend is {jax.default_backend()}."
    )
  if c.attention != "auto":
    return "cudnn" if c.attention == "cudnn" else "xla"
  return "cudnn" if jax.default_backend() == "gpu" and _cudnn_supports(c) else "xla"


def _cudnn_supports(c: LMConfig) -> bool:
  """The shapes and dtype cuDNN's flash attention takes (of those LMConfig allows)."""
  head_dim = c.d_model // c.num_heads
  return c.dtype == "bfloat16" and head_dim % 8 == 0 and head_dim <= 128


class _QKV(nn.Module):
  """Queries, keys and values [B, T, H, D/H] from one [D, 3D] kernel.

  The parameter of a bias-free `nn.Dense(3D)` (same shape, initializer, name in
  the block), applied as three matmuls: each output is written in the layout
  attention reads, where slicing one [B, T, 3D] product copies all three (a net
  gain on the H100, BUILD_NOTES.md).
  """

  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h_BxTxD):
    _B, _T, D = h_BxTxD.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (D, 3 * D))
    kernel_Dx3xHxK = kernel.astype(self.dtype).reshape(D, 3, self.num_heads, -1)
    h_BxTxD = h_BxTxD.astype(self.dtype)
    return [jnp.einsum("btd,dhk->bthk", h_BxTxD, kernel_Dx3xHxK[:, i]) for i in range(3)]


class _Block(nn.Module):
  config: LMConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    B, T, D = x_BxTxD.shape
    dt = jnp.dtype(c.dtype)
    h = nn.LayerNorm(dtype=dt)(x_BxTxD)
    # Explicit names: the layout of every checkpoint written before _QKV existed.
    q, k, v = _QKV(c.num_heads, dt, name="Dense_0")(h)
    out = jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=_attention_implementation(c)
    ).reshape(B, T, D)
    x_BxTxD = x_BxTxD + nn.Dense(D, use_bias=False, dtype=dt, name="Dense_1")(out)
    h = nn.LayerNorm(dtype=dt)(x_BxTxD)
    h = nn.Dense(c.d_ff, dtype=dt, name="Dense_3")(h)
    # Rematerialized: the backward pass recomputes GELU from its input instead of
    # keeping its tanh: less peak memory, for an elementwise recomputation that is
    # cheap next to the matmuls.
    h = nn.Dense(D, dtype=dt, name="Dense_2")(jax.checkpoint(nn.gelu)(h))
    return x_BxTxD + h


class TransformerLM(nn.Module):
  """Causal transformer; returns next-token logits [B, T, V]."""

  config: LMConfig

  @nn.compact
  def __call__(self, inputs_BxT):
    c = self.config
    chex.assert_rank(inputs_BxT, 2)
    T = inputs_BxT.shape[1]
    dt = jnp.dtype(c.dtype)
    # A one-hot matmul, not a gather: the same numbers forward (one nonzero term),
    # and backward a dense matmul where a gather's gradient is a scatter-add whose
    # atomics collide on the few table rows (BUILD_NOTES.md).
    table = nn.Embed(c.vocab_size, c.d_model, dtype=dt).embedding
    x = jnp.dot(
      jax.nn.one_hot(inputs_BxT, c.vocab_size, dtype=dt),
      table.astype(dt),
      precision=jax.lax.Precision.HIGHEST,
    )
    pos_TxD = self.param("pos_embedding", nn.initializers.normal(0.02), (c.max_len, c.d_model))
    x = x + pos_TxD[None, :T].astype(dt)
    for _ in range(c.num_layers):
      x = _Block(c)(x)
    return nn.Dense(c.vocab_size, dtype=dt)(nn.LayerNorm(dtype=dt)(x))


@functools.partial(jax.jit, static_argnums=0)
def init_lm(config: LMConfig, key: jax.Array):
  """Parameters of one TransformerLM (one compiled program: run op by op, flax's init
  took about 15 s per launch on the 2-core CPU)."""
  return TransformerLM(config).init(key, jnp.zeros((1, config.max_len), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_stacked_lm(config: LMConfig, key: jax.Array, num_models: int):
  """Parameters of `num_models` TransformerLMs stacked on a leading axis."""
  return jax.vmap(lambda k: init_lm(config, k))(jax.random.split(key, num_models))


def check_params(config: LMConfig, params, num_models: int | None = None) -> None:
  """InputError unless `params` has exactly the structure and shapes `config` implies
  (with a leading axis of `num_models` for stacked models)."""
  expected = jax.eval_shape(lambda: init_lm(config, jax.random.PRNGKey(0)))
  want = {
    jax.tree_util.keystr(p): (num_models,) * (num_models is not None) + leaf.shape
    for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  got = {
    jax.tree_util.keystr(p): jnp.shape(leaf)
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  for path in sorted(set(want) | set(got)):
    if want.get(path) != got.get(path):
      raise InputError(
        f"parameters do not match the architecture {config}: {path} has shape "
        f"{got.get(path, 'missing')}, the config implies {want.get(path, 'none')}."
      )


def next_token_logprobs(config: LMConfig, params, inputs_BxT) -> jax.Array:
  """Full next-token log-distributions log p(· | x_≤t), [B, T, V].

  The log-softmax (a log-sum-exp over the vocabulary) is float32 whatever the
  compute dtype: every loss, cache and gate downstream works in float32.
  """
  logits = cast(jax.Array, TransformerLM(config).apply(params, inputs_BxT))
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(config: LMConfig, params, inputs_BxT, targets_BxT) -> jax.Array:
  """log p(target_t | x_≤t) of the observed targets, [B, T]."""
  logp_BxTxV = next_token_logprobs(config, params, inputs_BxT)
  return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def stacked_token_logprobs(config: LMConfig, params_M, inputs_BxT, targets_BxT) -> jax.Array:
  """Every stacked model's log-probs of the same targets, [B, T, M]."""
  logp_MxBxT = jax.vmap(token_logprobs, in_axes=(None, 0, None, None))(
    config, params_M, inputs_BxT, targets_BxT
  )
  return jnp.moveaxis(logp_MxBxT, 0, -1)


def prefix_loglik(logp_BxTxM: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """log p_j(x_<t): exclusive cumulative sum of the observed-token log-probs."""
  masked = jnp.where(mask_BxT[..., None], logp_BxTxM, 0.0)
  # Shifted, not cumsum − x: that is −inf − (−inf) = NaN after a missed token.
  inclusive = jnp.cumsum(masked, axis=1)
  return jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=1)


@dataclasses.dataclass(frozen=True)
class GateConfig:
  num_experts: int
  vocab_size: int
  max_len: int
  hidden: int = 32
  token_embed: int = 0  # width of a token embedding feature; 0 = none
  pos_embed: int = 8  # width of the position embedding feature


class CausalGate(nn.Module):
  """log π_w(x_≤t) ∈ log Δ_M from the prefix and the experts' prefix likelihoods."""

  config: GateConfig

  @nn.compact
  def __call__(self, inputs_BxT, prefix_loglik_BxTxM):
    c = self.config
    T = inputs_BxT.shape[1]
    # Relative prefix log-likelihoods; -inf (an expert that missed a token) stays
    # -inf in the logits and is floored for the network's features.
    rel_BxTxM = prefix_loglik_BxTxM - jnp.max(prefix_loglik_BxTxM, -1, keepdims=True)
    alive_BxTxM = jnp.isfinite(rel_BxTxM)
    rel_BxTxM = jnp.where(alive_BxTxM, rel_BxTxM, -1e4)  # no inf in any gradient
    feats = [
      jnp.maximum(rel_BxTxM, -30.0) / 10.0,
      jnp.broadcast_to(
        nn.Embed(c.max_len, c.pos_embed).embedding[:T], (*inputs_BxT.shape, c.pos_embed)
      ),
    ]
    if c.token_embed:
      feats.append(nn.Embed(c.vocab_size, c.token_embed)(inputs_BxT))
    h = nn.gelu(nn.Dense(c.hidden)(jnp.concatenate(feats, axis=-1)))
    correction = nn.Dense(c.num_experts, kernel_init=nn.initializers.zeros)(h)
    temperature = self.param("posterior_scale", nn.initializers.ones, ())
    logits = jnp.where(alive_BxTxM, temperature * rel_BxTxM, -jnp.inf)
    return jax.nn.log_softmax(logits + correction, axis=-1)


def init_gate(config: GateConfig, key: jax.Array):
  T = config.max_len
  return CausalGate(config).init(
    key, jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T, config.num_experts))
  )


def gate_log_weights(config: GateConfig, params, inputs_BxT, prefix_loglik_BxTxM) -> jax.Array:
  """log π_w, [B, T, M]."""
  return cast(jax.Array, CausalGate(config).apply(params, inputs_BxT, prefix_loglik_BxTxM))
