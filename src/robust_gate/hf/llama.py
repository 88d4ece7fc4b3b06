"""Llama (model_type "llama") as a pure function of its checkpoint's parameters.

Token embedding without positions; pre-RMSNorm blocks of grouped-query attention
(G = num_key_value_heads ≤ H query heads; rotary position embedding on queries and
keys, frequencies θ^(−2i/K) with θ = rope_theta, applied to the two halves of each
head as (x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin), the layout of Hugging Face
checkpoints) and a SwiGLU MLP down(silu(gate(x)) · up(x)); a final RMSNorm; logits
against lm_head, or the embedding when tied. torch stores every projection
[out, in]: each is transposed once, at load.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from robust_gate.checks import InputError
from robust_gate.hf import checkpoint, layers
from robust_gate.hf.checkpoint import Tensor, config_value


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  d_model: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_kv_heads: int  # G: key/value heads, each shared by H / G query heads
  head_dim: int
  eps: float  # RMSNorm's epsilon
  rope_theta: float
  tied: bool  # logits against the embedding (no lm_head)


def _rope_theta(c: Mapping, path: str) -> float:
  """θ from `rope_parameters` (transformers ≥ 5) or `rope_theta` (before); scaled
  variants of the rotary embedding (llama3, linear, dynamic, yarn) are refused."""
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  if not isinstance(rope, dict):
    raise InputError(f"{path}/config.json: rope parameters {rope!r} must be a JSON object.")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise InputError(f"{path}/config.json: rope type {kind!r} is not supported, only 'default'.")
  theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
    raise InputError(f"{path}/config.json: rope_theta={theta!r} must be a positive number.")
  return float(theta)


def config_from_json(c: Mapping, path: str) -> Config:
  """The Config of a Llama config.json; options this forward pass does not compute
  are refused, not ignored."""
  unsupported = {
    "hidden_act": c.get("hidden_act", "silu") != "silu",
    "attention_bias": c.get("attention_bias", False),
    "mlp_bias": c.get("mlp_bias", False),
  }
  for key, refused in unsupported.items():
    if refused:
      raise InputError(f"{path}/config.json: {key}={c.get(key)!r} is not supported for llama.")
  d_model = config_value(c, "hidden_size", int, path)
  num_heads = config_value(c, "num_attention_heads", int, path)
  num_kv_heads = config_value(c, "num_key_value_heads", int, path, default=num_heads)
  if num_heads % num_kv_heads:
    raise InputError(
      f"{path}/config.json: num_attention_heads={num_heads} is not a multiple of "
      f"num_key_value_heads={num_kv_heads}."
    )
  return Config(
    vocab_size=config_value(c, "vocab_size", int, path),
    d_model=d_model,
    d_ff=config_value(c, "intermediate_size", int, path),
    num_layers=config_value(c, "num_hidden_layers", int, path),
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    head_dim=config_value(c, "head_dim", int, path, default=d_model // num_heads),
    eps=config_value(c, "rms_norm_eps", float, path, default=1e-6),
    rope_theta=_rope_theta(c, path),
    tied=config_value(c, "tie_word_embeddings", bool, path, default=False),
  )


def spec(c: Config) -> checkpoint.Spec:
  D, F, K = c.d_model, c.d_ff, c.head_dim
  top = {
    "embed": Tensor("model.embed_tokens.weight", (c.vocab_size, D)),
    "norm": Tensor("model.norm.weight", (D,)),
  }
  if not c.tied:
    top["lm_head"] = Tensor("lm_head.weight", (c.vocab_size, D))
  layer = "model.layers.{i}."
  return checkpoint.Spec(
    top=top,
    layers={
      "input_norm": Tensor(layer + "input_layernorm.weight", (D,)),
      "q": Tensor(layer + "self_attn.q_proj.weight", (c.num_heads * K, D), transpose=True),
      "k": Tensor(layer + "self_attn.k_proj.weight", (c.num_kv_heads * K, D), transpose=True),
      "v": Tensor(layer + "self_attn.v_proj.weight", (c.num_kv_heads * K, D), transpose=True),
      "o": Tensor(layer + "self_attn.o_proj.weight", (D, c.num_heads * K), transpose=True),
      "post_norm": Tensor(layer + "post_attention_layernorm.weight", (D,)),
      "gate": Tensor(layer + "mlp.gate_proj.weight", (F, D), transpose=True),
      "up": Tensor(layer + "mlp.up_proj.weight", (F, D), transpose=True),
      "down": Tensor(layer + "mlp.down_proj.weight", (D, F), transpose=True),
    },
    num_layers=c.num_layers,
    # Older files keep the rotary frequencies as a buffer; a tied head may be written out.
    ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    + (r"|lm_head\.weight" if c.tied else ""),
  )


def rope_tables(T: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles t·θ^(−2i/K), [T, K] (float32; each frequency
  twice, once per half of the head)."""
  inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TxK2 = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
  angles_TxK = jnp.concatenate([angles_TxK2, angles_TxK2], axis=-1)
  return jnp.cos(angles_TxK), jnp.sin(angles_TxK)


def rotate(x_BxTxHxK: jax.Array, cos_TxK: jax.Array, sin_TxK: jax.Array) -> jax.Array:
  """The rotary embedding: each head's halves (x₁, x₂) rotated pairwise."""
  half = x_BxTxHxK.shape[-1] // 2
  x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_TxK[None, :, None].astype(x_BxTxHxK.dtype)
  sin = sin_TxK[None, :, None].astype(x_BxTxHxK.dtype)
  return x_BxTxHxK * cos + rotated * sin


def logits(c: Config, params, ids_BxT: jax.Array) -> jax.Array:
  """Next-token logits [B, T, V] (float32) for checkpoint token ids."""
  B, T = ids_BxT.shape
  prec = layers.precision(params["embed"].dtype)
  cos_TxK, sin_TxK = rope_tables(T, c.head_dim, c.rope_theta)
  x_BxTxD = jnp.take(params["embed"], ids_BxT, axis=0)

  def block(x_BxTxD, p):
    h = layers.rms_norm(x_BxTxD, p["input_norm"], c.eps)
    q = layers.dense(h, p["q"], precision=prec).reshape(B, T, c.num_heads, c.head_dim)
    k = layers.dense(h, p["k"], precision=prec).reshape(B, T, c.num_kv_heads, c.head_dim)
    v = layers.dense(h, p["v"], precision=prec).reshape(B, T, c.num_kv_heads, c.head_dim)
    q, k = rotate(q, cos_TxK, sin_TxK), rotate(k, cos_TxK, sin_TxK)
    a = layers.causal_attention(q, k, v, c.head_dim**-0.5, precision=prec)
    x_BxTxD = x_BxTxD + layers.dense(a, p["o"], precision=prec)
    h = layers.rms_norm(x_BxTxD, p["post_norm"], c.eps)
    gated = jax.nn.silu(layers.dense(h, p["gate"], precision=prec))
    h = layers.dense(gated * layers.dense(h, p["up"], precision=prec), p["down"], precision=prec)
    return x_BxTxD + h, None

  x_BxTxD, _ = jax.lax.scan(block, x_BxTxD, params["layers"])
  x_BxTxD = layers.rms_norm(x_BxTxD, params["norm"], c.eps)
  head_VxD = params["embed"] if c.tied else params["lm_head"]
  return layers.head_logits(x_BxTxD, head_VxD, precision=prec)
