"""The key/value cache of the checkpoint families' decode steps (GPT-2, Llama).

A family's block is one function of an `attend(q, k, v, scale, precision=...) ->
(out, aux)` it is given: the full forward pass gives it `full_attention` (causal
attention over the whole sequence, aux None); a decode step (`step_layers`) gives it
the attention of the one new position t over the cache, and the aux that comes back
is that position's key and value, which `step_layers` writes into the cache. The
projections, normalizations and MLP are therefore the full forward's code, and the
attention mirrors `layers.causal_attention` operation for operation (scores in
float32, masked with -inf, softmax cast to the values' dtype), so a decode step's
log-probabilities equal the full forward's at t up to the order of float32 sums.

Positions ≥ t in the cache are masked, whatever they hold (zeros until written), so
one static cache length S serves every step: a step costs O(S) in attention and
O(1) in everything else, where rerunning the prefix costs O(t) in everything.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from robust_gate.hf import layers


class KVCache(NamedTuple):
  """Keys and values of positions < t, every layer: [L, B, S, G, K] each (G key/value
  heads of width K; S the longest sequence the cache holds), in the parameters' dtype
  (the dtype the full forward computes them in)."""

  k_LxBxSxGxK: jax.Array
  v_LxBxSxGxK: jax.Array


def empty(num_layers: int, batch_size: int, max_len: int, heads: int, head_dim: int, dtype):
  """A cache of `max_len` positions, nothing written yet."""
  shape = (num_layers, batch_size, max_len, heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def full_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale: float, *, precision):
  """The full forward's attend: causal attention over the sequence, no aux."""
  return layers.causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale, precision=precision), None


def attention_at(
  q_Bx1xHxK, k_BxSxGxK, v_BxSxGxK, t, scale: float, *, precision=jax.lax.Precision.HIGHEST
) -> jax.Array:
  """Position t's row of `layers.causal_attention`, [B, 1, H·K]: its query against
  the keys and values of positions ≤ t (those after t masked out)."""
  B, _, H, K = q_Bx1xHxK.shape
  S, G = k_BxSxGxK.shape[1:3]
  q_Bx1xGxRxK = q_Bx1xHxK.reshape(B, 1, G, H // G, K)
  s_BxGxRx1xS = jnp.einsum(
    "btgrk,bsgk->bgrts",
    q_Bx1xGxRxK,
    k_BxSxGxK,
    precision=precision,
    preferred_element_type=jnp.float32,
  )
  seen_S = jnp.arange(S) <= t
  # -inf is safe: position t itself is always seen, so the row is never empty.
  s_BxGxRx1xS = jnp.where(seen_S[None, None, None, None], s_BxGxRx1xS * scale, -jnp.inf)
  p_BxGxRx1xS = jax.nn.softmax(s_BxGxRx1xS, axis=-1).astype(v_BxSxGxK.dtype)
  out_Bx1xGxRxK = jnp.einsum("bgrts,bsgk->btgrk", p_BxGxRx1xS, v_BxSxGxK, precision=precision)
  return out_Bx1xGxRxK.reshape(B, 1, H * K)


def step_layers(block, x_Bx1xD, layers_params, cache: KVCache, t):
  """Runs the stacked layers on position t's activations, [B, 1, D], given
  `block(x, p, attend) -> (x, aux)` (the family's block, which passes `attend` its
  position's q, k, v); returns the activations after the last layer and the cache with
  position t's keys and values written in.

  The scan reads each layer's cache and returns only the new position's key and value
  ([L, B, G, K]), written once after it: the carried cache is updated in place, not
  rebuilt, at every step.
  """

  def layer(x_Bx1xD, inputs):
    p, k_BxSxGxK, v_BxSxGxK = inputs

    def attend(q_Bx1xHxK, k_Bx1xGxK, v_Bx1xGxK, scale, *, precision):
      k_BxSxGxK_t = jax.lax.dynamic_update_slice_in_dim(k_BxSxGxK, k_Bx1xGxK, t, axis=1)
      v_BxSxGxK_t = jax.lax.dynamic_update_slice_in_dim(v_BxSxGxK, v_Bx1xGxK, t, axis=1)
      out = attention_at(q_Bx1xHxK, k_BxSxGxK_t, v_BxSxGxK_t, t, scale, precision=precision)
      return out, (k_Bx1xGxK, v_Bx1xGxK)

    return block(x_Bx1xD, p, attend)

  x_Bx1xD, (k_LxBx1xGxK, v_LxBx1xGxK) = jax.lax.scan(
    layer, x_Bx1xD, (layers_params, cache.k_LxBxSxGxK, cache.v_LxBxSxGxK)
  )
  return x_Bx1xD, KVCache(
    jax.lax.dynamic_update_slice_in_dim(cache.k_LxBxSxGxK, k_LxBx1xGxK, t, axis=2),
    jax.lax.dynamic_update_slice_in_dim(cache.v_LxBxSxGxK, v_LxBx1xGxK, t, axis=2),
  )
