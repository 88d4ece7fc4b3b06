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
from robust_gate.hf import checkpoint, layers
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


def logits(c: Config, params, ids_BxT: jax.Array) -> jax.Array:
  """Next-token logits [B, T, V] (float32) for checkpoint token ids."""
  B, T = ids_BxT.shape
  if c.max_len < T:
    raise InputError(f"sequences of {T} tokens exceed this GPT-2's n_positions={c.max_len}.")
  dtype = params["wte"].dtype
  prec = layers.precision(dtype)
  H = c.num_heads
  x_BxTxD = jnp.take(params["wte"], ids_BxT, axis=0) + params["wpe"][None, :T]

  def block(x_BxTxD, p):
    h = layers.layer_norm(x_BxTxD, p["ln_1_scale"], p["ln_1_bias"], c.eps)
    qkv_BxTx3D = layers.dense(h, p["qkv_w"], p["qkv_b"], precision=prec)
    q, k, v = (a.reshape(B, T, H, -1) for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
    a = layers.causal_attention(q, k, v, (c.d_model // H) ** -0.5, precision=prec)
    x_BxTxD = x_BxTxD + layers.dense(a, p["attn_out_w"], p["attn_out_b"], precision=prec)
    h = layers.layer_norm(x_BxTxD, p["ln_2_scale"], p["ln_2_bias"], c.eps)
    h = jax.nn.gelu(layers.dense(h, p["fc_w"], p["fc_b"], precision=prec), approximate=True)
    return x_BxTxD + layers.dense(h, p["proj_w"], p["proj_b"], precision=prec), None

  x_BxTxD, _ = jax.lax.scan(block, x_BxTxD, params["layers"])
  x_BxTxD = layers.layer_norm(x_BxTxD, params["ln_f_scale"], params["ln_f_bias"], c.eps)
  return layers.head_logits(x_BxTxD, params["wte"], precision=prec)
