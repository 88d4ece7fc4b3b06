"""GPT-2 (model_type "gpt2") as a pure function of its checkpoint's parameters.

Token plus learned absolute position embeddings; pre-LayerNorm blocks of
multi-head attention (queries, keys and values from one [D, 3D] projection,
scores scaled by 1/√(D/H)) and an MLP with GELU's tanh approximation
("gelu_new"); a final LayerNorm; logits against the token embedding (tied).
GPT-2 stores its projections [in, out] (its Conv1D), so none is transposed.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from robust_gate.checks import InputError
from robust_gate.hf import checkpoint, decode, layers
from robust_gate.hf.checkpoint import Tensor, config_value

# The tanh approximation of GELU under its two names in transformers.
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  max_len: int  # n_positions: the learned position table's length
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  eps: float  # LayerNorm's epsilon


def config_from_json(c: Mapping, path: str) -> Config:
  """The Config of a GPT-2 config.json; options that change the function and that
  no released GPT-2 uses are refused, not ignored."""
  unsupported = {
    "activation_function": (c.get("activation_function", "gelu_new") not in _ACTIVATIONS),
    "scale_attn_weights": c.get("scale_attn_weights", True) is not True,
    "scale_attn_by_inverse_layer_idx": c.get("scale_attn_by_inverse_layer_idx", False),
    "tie_word_embeddings": c.get("tie_word_embeddings", True) is not True,
    "add_cross_attention": c.get("add_cross_attention", False),
  }
  for key, refused in unsupported.items():
    if refused:
      raise InputError(f"{path}/config.json: {key}={c.get(key)!r} is not supported for gpt2.")
  d_model = config_value(c, "n_embd", int, path)
  num_heads = config_value(c, "n_head", int, path)
  if d_model % num_heads:
    raise InputError(f"{path}/config.json: n_embd={d_model} is not divisible by n_head.")
  return Config(
    vocab_size=config_value(c, "vocab_size", int, path),
    max_len=config_value(c, "n_positions", int, path),
    d_model=d_model,
    num_layers=config_value(c, "n_layer", int, path),
    num_heads=num_heads,
    # n_inner is null in most configs: four times the width.
    d_ff=config_value(c, "n_inner", int, path, default=4 * d_model),
    eps=config_value(c, "layer_norm_epsilon", float, path, default=1e-5),
  )


def spec(c: Config) -> checkpoint.Spec:
  D, F = c.d_model, c.d_ff
  return checkpoint.Spec(
    top={
      "wte": Tensor("wte.weight", (c.vocab_size, D)),
      "wpe": Tensor("wpe.weight", (c.max_len, D)),
      "ln_f_scale": Tensor("ln_f.weight", (D,)),
      "ln_f_bias": Tensor("ln_f.bias", (D,)),
    },
    layers={
      "ln_1_scale": Tensor("h.{i}.ln_1.weight", (D,)),
      "ln_1_bias": Tensor("h.{i}.ln_1.bias", (D,)),
      "qkv_w": Tensor("h.{i}.attn.c_attn.weight", (D, 3 * D)),
      "qkv_b": Tensor("h.{i}.attn.c_attn.bias", (3 * D,)),
      "attn_out_w": Tensor("h.{i}.attn.c_proj.weight", (D, D)),
      "attn_out_b": Tensor("h.{i}.attn.c_proj.bias", (D,)),
      "ln_2_scale": Tensor("h.{i}.ln_2.weight", (D,)),
      "ln_2_bias": Tensor("h.{i}.ln_2.bias", (D,)),
      "fc_w": Tensor("h.{i}.mlp.c_fc.weight", (D, F)),
      "fc_b": Tensor("h.{i}.mlp.c_fc.bias", (F,)),
      "proj_w": Tensor("h.{i}.mlp.c_proj.weight", (F, D)),
      "proj_b": Tensor("h.{i}.mlp.c_proj.bias", (D,)),
    },
    num_layers=c.num_layers,
    # Older files keep the causal-mask buffers; a tied head may be written out too.
    ignored=r"h\.\d+\.attn\.(masked_)?bias|lm_head\.weight",
    # GPT2LMHeadModel writes "transformer.h.0…", GPT2Model (and the original
    # openai-community/gpt2 files) "h.0…": one naming for both.
    rename=lambda name: name.removeprefix("transformer."),
    saved_name=lambda name: "transformer." + name,  # as GPT2LMHeadModel saves them
  )


def _block(c: Config, prec, x_BxTxD, p, attend):
  """One pre-LayerNorm block; `attend` is the full forward's attention or a decode
  step's (robust_gate.hf.decode), the aux it returns passed on."""
  B, T, _ = x_BxTxD.shape
  H = c.num_heads
  h = layers.layer_norm(x_BxTxD, p["ln_1_scale"], p["ln_1_bias"], c.eps)
  qkv_BxTx3D = layers.dense(h, p["qkv_w"], p["qkv_b"], precision=prec)
  q, k, v = (a.reshape(B, T, H, -1) for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
  a, aux = attend(q, k, v, (c.d_model // H) ** -0.5, precision=prec)
  x_BxTxD = x_BxTxD + layers.dense(a, p["attn_out_w"], p["attn_out_b"], precision=prec)
  h = layers.layer_norm(x_BxTxD, p["ln_2_scale"], p["ln_2_bias"], c.eps)
  h = jax.nn.gelu(layers.dense(h, p["fc_w"], p["fc_b"], precision=prec), approximate=True)
  return x_BxTxD + layers.dense(h, p["proj_w"], p["proj_b"], precision=prec), aux


def _head(c: Config, params, x_BxTxD, prec) -> jax.Array:
  x_BxTxD = layers.layer_norm(x_BxTxD, params["ln_f_scale"], params["ln_f_bias"], c.eps)
  return layers.head_logits(x_BxTxD, params["wte"], precision=prec)


def _check_length(c: Config, T: int) -> None:
  if c.max_len < T:
    raise InputError(f"sequences of {T} tokens exceed this GPT-2's n_positions={c.max_len}.")


def logits(c: Config, params, ids_BxT: jax.Array) -> jax.Array:
  """Next-token logits [B, T, V] (float32) for checkpoint token ids."""
  T = ids_BxT.shape[1]
  _check_length(c, T)
  prec = layers.precision(params["wte"].dtype)
  x_BxTxD = jnp.take(params["wte"], ids_BxT, axis=0) + params["wpe"][None, :T]
  block = lambda x, p: _block(c, prec, x, p, decode.full_attention)
  x_BxTxD, _ = jax.lax.scan(block, x_BxTxD, params["layers"])
  return _head(c, params, x_BxTxD, prec)


def init_cache(c: Config, params, batch_size: int, max_len: int) -> decode.KVCache:
  """An empty key/value cache for sequences of up to `max_len` tokens."""
  _check_length(c, max_len)
  dtype = params["wte"].dtype
  H = c.num_heads
  return decode.empty(c.num_layers, batch_size, max_len, H, c.d_model // H, dtype)


def decode_step(
  c: Config, params, cache: decode.KVCache, ids_B: jax.Array, t
) -> tuple[jax.Array, decode.KVCache]:
  """`logits`' row t, [B, V] (float32), from position t's ids and the cache of the
  positions before it; returns the cache with position t added. t < the cache's length."""
  _check_length(c, cache.k_LxBxSxGxK.shape[2])
  prec = layers.precision(params["wte"].dtype)
  pos_1xD = jax.lax.dynamic_slice_in_dim(params["wpe"], t, 1)
  x_Bx1xD = jnp.take(params["wte"], ids_B[:, None], axis=0) + pos_1xD[None]
  block = lambda x, p, attend: _block(c, prec, x, p, attend)
  x_Bx1xD, cache = decode.step_layers(block, x_Bx1xD, params["layers"], cache, t)
  return _head(c, params, x_Bx1xD, prec)[:, 0], cache
