"""The layers GPT-2 and Llama share, written from their definitions.

Activations run in the parameters' dtype; normalizations and the attention softmax
in float32 whatever it is (as the reference implementations do), so a bfloat16
model loses precision in its matmuls only. Matmuls of a float32 model run at full
float32 precision (`precision`), not the TF32 or bfloat16 passes some accelerators
use by default: float32 is the mode that must reproduce the checkpoint's numbers.
"""

import jax
import jax.numpy as jnp


def precision(dtype) -> jax.lax.Precision:
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def per_feature(v_F: jax.Array, ndim: int) -> jax.Array:
  """A [F] vector shaped to broadcast over the last axis of a rank-`ndim` array."""
  return v_F.reshape((1,) * (ndim - 1) + v_F.shape)


def dense(x_BxTxI, w_IxO, b_O=None, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  y = jnp.einsum("bti,io->bto", x_BxTxI, w_IxO, precision=precision)
  return y if b_O is None else y + per_feature(b_O, 3)


def layer_norm(x_BxTxD, scale_D, bias_D, eps: float) -> jax.Array:
  x = x_BxTxD.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  y = y * per_feature(scale_D.astype(jnp.float32), 3) + per_feature(bias_D.astype(jnp.float32), 3)
  return y.astype(x_BxTxD.dtype)


def rms_norm(x_BxTxD, scale_D, eps: float) -> jax.Array:
  """x / rms(x) in float32, cast back, then scaled (Llama's order of operations)."""
  x = x_BxTxD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return per_feature(scale_D, 3) * y.astype(x_BxTxD.dtype)


def causal_attention(
  q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale: float, *, precision=jax.lax.Precision.HIGHEST
) -> jax.Array:
  """Causal softmax attention, [B, T, H·K]; G ≤ H key/value heads, query head h
  reading key/value head h // (H / G) (grouped-query attention; G = H is multi-head)."""
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxTxGxK.shape[2]
  q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
  s_BxGxRxTxS = jnp.einsum(
    "btgrk,bsgk->bgrts",
    q_BxTxGxRxK,
    k_BxTxGxK,
    precision=precision,
    preferred_element_type=jnp.float32,
  )
  causal_TxS = jnp.tril(jnp.ones((T, T), bool))
  # -inf is safe: the diagonal is always allowed, so no row is empty.
  s_BxGxRxTxS = jnp.where(causal_TxS[None, None, None], s_BxGxRxTxS * scale, -jnp.inf)
  p_BxGxRxTxS = jax.nn.softmax(s_BxGxRxTxS, axis=-1).astype(v_BxTxGxK.dtype)
  out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", p_BxGxRxTxS, v_BxTxGxK, precision=precision)
  return out_BxTxGxRxK.reshape(B, T, H * K)


def head_logits(x_BxTxD, table_VxD, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """float32 logits against a [V, D] table: the embedding (tied) or a head as torch
  stores it."""
  return jnp.einsum(
    "btd,vd->btv", x_BxTxD, table_VxD, precision=precision, preferred_element_type=jnp.float32
  )
