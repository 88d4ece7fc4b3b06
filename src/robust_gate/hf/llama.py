"""Llama (model_type "llama") as a pure function of its checkpoint's parameters.

Token embedding without positions; pre-RMSNorm blocks of grouped-query attention
(G = num_key_value_heads ≤ H query heads; rotary position embedding on queries and
keys, frequencies θ^(−2i/K) with θ = rope_theta, or their "linear" and "llama3"
rescalings (`Rope`), applied to the two halves of each head as (x₁, x₂) ↦
(x₁ cos − x₂ sin, x₂ cos + x₁ sin), the layout of Hugging Face checkpoints) and a
SwiGLU MLP down(silu(gate(x)) · up(x)); a final RMSNorm; logits against lm_head, or
the embedding when tied. torch stores every projection [out, in]: each is
transposed once, at load.
"""

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from robust_gate.checks import InputError
from robust_gate.hf import checkpoint, decode, layers
from robust_gate.hf.checkpoint import Tensor, config_value

ROPE_TYPES = ("default", "linear", "llama3")  # the rotary embeddings computed here


@dataclasses.dataclass(frozen=True)
class Rope:
  """The rotary embedding's inverse frequencies ω_i, as config.json describes them.

  "default": ω_i = θ^(−2i/K). "linear": each ω_i divided by `factor` (positions
  interpolated `factor` times more finely). "llama3" (Llama 3.1 onwards): by
  wavelength λ = 2π/ω against the pre-training context L =
  `original_max_position_embeddings`: ω kept where λ < L / high_freq_factor (the
  fast rotations, which resolve nearby tokens), divided by `factor` where λ > L /
  low_freq_factor, and in between (1 − s) ω / factor + s ω with s = (L/λ − low) /
  (high − low), continuous at both edges. None of the three scales cos/sin or the
  attention, and none depends on the sequence length, so one table of frequencies
  serves every batch; "dynamic" (frequencies that follow each batch's length) and
  "yarn" (an attention factor as well) are refused. The fields keep transformers'
  key names, so the record is written back to config.json as it is
  (robust_gate.hf.export)."""

  rope_theta: float = 10000.0
  rope_type: str = "default"  # one of ROPE_TYPES
  factor: float | None = None  # linear and llama3
  low_freq_factor: float | None = None  # llama3
  high_freq_factor: float | None = None  # llama3
  original_max_position_embeddings: int | None = None  # llama3

  def scaling(self) -> dict:
    """transformers < 5's `rope_scaling` object (rope_type and the variant's fields,
    θ apart as top-level rope_theta); {} for the default, which has none."""
    if self.rope_type == "default":
      return {}
    fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    del fields["rope_theta"]
    return fields

  def parameters(self) -> dict:
    """transformers ≥ 5's `rope_parameters` object: the type, θ and the variant's fields."""
    return {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.scaling()}


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
  rope: Rope
  tied: bool  # logits against the embedding (no lm_head)


def _positive(value, name: str, path: str, kind: type = float):
  """`value` as a finite positive `kind` (float accepts JSON's ints), or InputError
  naming `name`, its key in config.json."""
  kinds = (int,) if kind is int else (int, float)
  valid = not isinstance(value, bool) and isinstance(value, kinds)
  if not (valid and math.isfinite(value) and value > 0):
    raise InputError(f"{path}/config.json: {name}={value!r} must be a positive {kind.__name__}.")
  return kind(value)


def _rope_from(c: Mapping, key: str | None, path: str) -> Rope:
  """The Rope of the object config.json holds under `key` ("rope_parameters" or
  "rope_scaling", or neither: None); θ from the object, else the top-level
  rope_theta, else transformers' default 10000. Where both give θ they must agree:
  transformers ≥ 5 reads the object's, earlier versions the top-level one."""
  rope = {} if key is None else c[key]
  if not isinstance(rope, dict):
    raise InputError(f"{path}/config.json: {key}={rope!r} must be a JSON object.")
  if any(isinstance(v, dict) for v in rope.values()):
    raise InputError(f"{path}/config.json: {key} holds one rotary embedding per layer type.")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise InputError(
      f"{path}/config.json: {key} has rope type {kind!r}, which is not supported; "
      f"supported: {', '.join(ROPE_TYPES)}."
    )
  partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise InputError(f"{path}/config.json: partial_rotary_factor={partial!r} is not supported.")
  outer = c.get("rope_theta")
  theta = 10000.0 if outer is None else _positive(outer, "rope_theta", path)
  if rope.get("rope_theta") is not None:
    inner = _positive(rope["rope_theta"], f"{key}.rope_theta", path)
    if outer is not None and inner != theta:
      raise InputError(
        f"{path}/config.json: rope_theta={outer!r} disagrees with {key}.rope_theta={inner!r}."
      )
    theta = inner

  def field(name: str, as_type: type = float):
    if rope.get(name) is None:
      raise InputError(f"{path}/config.json: {key} of rope type {kind!r} has no {name!r}.")
    return _positive(rope[name], f"{key}.{name}", path, as_type)

  if kind == "default":
    return Rope(rope_theta=theta)
  factor = field("factor")
  if kind == "linear":
    return Rope(theta, kind, factor)
  low, high = field("low_freq_factor"), field("high_freq_factor")
  if not low < high:
    raise InputError(
      f"{path}/config.json: {key}.low_freq_factor={low} must be less than "
      f"{key}.high_freq_factor={high}."
    )
  context = field("original_max_position_embeddings", int)
  if c.get("original_max_position_embeddings", context) != context:
    # transformers ≥ 5 would take the top-level one (as it does for Phi-3).
    raise InputError(
      f"{path}/config.json: original_max_position_embeddings="
      f"{c['original_max_position_embeddings']!r} disagrees with "
      f"{key}.original_max_position_embeddings={context}."
    )
  return Rope(theta, kind, factor, low, high, context)


def _rope(c: Mapping, path: str) -> Rope:
  """The rotary embedding of a config.json: `rope_parameters` (transformers ≥ 5),
  `rope_scaling` (before; transformers ≥ 5 reads it too, first), or neither (the
  default). A file with both is read only where they describe one embedding."""
  keys = [key for key in ("rope_parameters", "rope_scaling") if c.get(key) is not None]
  ropes = [_rope_from(c, key, path) for key in keys] or [_rope_from(c, None, path)]
  if len(set(ropes)) > 1:
    raise InputError(
      f"{path}/config.json: rope_parameters {ropes[0].parameters()} and rope_scaling "
      f"{ropes[1].parameters()} (θ from rope_theta) disagree."
    )
  return ropes[0]


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
    rope=_rope(c, path),
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


def inverse_frequencies(rope: Rope, head_dim: int) -> jax.Array:
  """The rotation speeds ω_i of the head's K/2 pairs, [K/2] float32 (`Rope`: θ^(−2i/K),
  rescaled by the variant). float32 throughout, as transformers computes them."""
  omega_K2 = 1.0 / rope.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if rope.rope_type == "default":
    return omega_K2
  factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
  context = rope.original_max_position_embeddings  # L: the pre-training context
  assert factor is not None  # every scaled variant has one (config_from_json)
  if rope.rope_type == "linear":
    return omega_K2 / factor
  assert rope.rope_type == "llama3" and low and high and context
  wavelength_K2 = 2 * math.pi / omega_K2
  s_K2 = (context / wavelength_K2 - low) / (high - low)  # 1 at λ = L/high, 0 at λ = L/low
  mixed_K2 = (1 - s_K2) * omega_K2 / factor + s_K2 * omega_K2
  slow_K2 = jnp.where(wavelength_K2 > context / low, omega_K2 / factor, mixed_K2)
  return jnp.where(wavelength_K2 < context / high, omega_K2, slow_K2)


def rope_tables(T: int, head_dim: int, rope: Rope) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotation angles t·ω_i, [T, K] (float32; each frequency
  twice, once per half of the head)."""
  inv_freq_K2 = inverse_frequencies(rope, head_dim)
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


def _block(c: Config, prec, cos_TxK, sin_TxK, x_BxTxD, p, attend):
  """One pre-RMSNorm block at the positions whose rotations are cos_TxK, sin_TxK;
  `attend` is the full forward's attention or a decode step's
  (robust_gate.hf.decode), the aux it returns passed on."""
  B, T, _ = x_BxTxD.shape
  h = layers.rms_norm(x_BxTxD, p["input_norm"], c.eps)
  q = layers.dense(h, p["q"], precision=prec).reshape(B, T, c.num_heads, c.head_dim)
  k = layers.dense(h, p["k"], precision=prec).reshape(B, T, c.num_kv_heads, c.head_dim)
  v = layers.dense(h, p["v"], precision=prec).reshape(B, T, c.num_kv_heads, c.head_dim)
  q, k = rotate(q, cos_TxK, sin_TxK), rotate(k, cos_TxK, sin_TxK)
  a, aux = attend(q, k, v, c.head_dim**-0.5, precision=prec)
  x_BxTxD = x_BxTxD + layers.dense(a, p["o"], precision=prec)
  h = layers.rms_norm(x_BxTxD, p["post_norm"], c.eps)
  gated = jax.nn.silu(layers.dense(h, p["gate"], precision=prec))
  h = layers.dense(gated * layers.dense(h, p["up"], precision=prec), p["down"], precision=prec)
  return x_BxTxD + h, aux


def _head(c: Config, params, x_BxTxD, prec) -> jax.Array:
  x_BxTxD = layers.rms_norm(x_BxTxD, params["norm"], c.eps)
  head_VxD = params["embed"] if c.tied else params["lm_head"]
  return layers.head_logits(x_BxTxD, head_VxD, precision=prec)


def logits(c: Config, params, ids_BxT: jax.Array) -> jax.Array:
  """Next-token logits [B, T, V] (float32) for checkpoint token ids."""
  T = ids_BxT.shape[1]
  prec = layers.precision(params["embed"].dtype)
  cos_TxK, sin_TxK = rope_tables(T, c.head_dim, c.rope)
  x_BxTxD = jnp.take(params["embed"], ids_BxT, axis=0)
  block = lambda x, p: _block(c, prec, cos_TxK, sin_TxK, x, p, decode.full_attention)
  x_BxTxD, _ = jax.lax.scan(block, x_BxTxD, params["layers"])
  return _head(c, params, x_BxTxD, prec)


def init_cache(c: Config, params, batch_size: int, max_len: int) -> decode.KVCache:
  """An empty key/value cache for sequences of up to `max_len` tokens (keys stored
  rotated: a key's rotation is fixed by its own position)."""
  dtype = params["embed"].dtype
  return decode.empty(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, dtype)


def decode_step(
  c: Config, params, cache: decode.KVCache, ids_B: jax.Array, t
) -> tuple[jax.Array, decode.KVCache]:
  """`logits`' row t, [B, V] (float32), from position t's ids and the cache of the
  positions before it; returns the cache with position t added. t < the cache's length."""
  prec = layers.precision(params["embed"].dtype)
  # Row t of the tables the full forward computes, computed the same way.
  S = cache.k_LxBxSxGxK.shape[2]
  cos_1xK, sin_1xK = (
    jax.lax.dynamic_slice_in_dim(table_SxK, t, 1)
    for table_SxK in rope_tables(S, c.head_dim, c.rope)
  )
  x_Bx1xD = jnp.take(params["embed"], ids_B[:, None], axis=0)
  block = lambda x, p, attend: _block(c, prec, cos_1xK, sin_1xK, x, p, attend)
  x_Bx1xD, cache = decode.step_layers(block, x_Bx1xD, params["layers"], cache, t)
  return _head(c, params, x_Bx1xD, prec)[:, 0], cache
