"""A `Model` saved as a Hugging Face checkpoint directory that transformers loads as is.

    hf.export.save(model, "out/student_hf")   # config.json, model.safetensors, tokenizer
    hf.load("out/student_hf")                 # the same parameters, bit for bit

The inverse of `hf.load`: each tensor goes back under the name, layout and shape
that transformers' `save_pretrained` gives it (the family's `checkpoint.Spec`: the
layers unstacked, torch's [out, in] projections transposed back, GPT-2's names
prefixed "transformer."; a tied head is not written, as transformers does not write
it). Weights are written in float32 whatever the model's dtype: safetensors' numpy
API has no bfloat16, and bfloat16 → float32 → bfloat16 is exact, so a bfloat16
model loaded back with dtype="bfloat16" is bitwise the same.

config.json starts from the source checkpoint's (the directory the model was loaded
from, when it still has one: options this code does not model, such as
max_position_embeddings, stay as they were) and every field the forward pass reads
is then written from the model's own `Config`, so the file describes the tensors
beside it. The tokenizer files are copied byte for byte (`tokenizer.json`, and
`tokenizer_config.json` / `special_tokens_map.json` when the source has them;
otherwise a `tokenizer_config.json` naming the fast tokenizer and BOS/EOS is
written, which is all `AutoTokenizer` needs).
"""

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from safetensors.numpy import save_file

from robust_gate import files, parallel
from robust_gate.checks import InputError
from robust_gate.hf import checkpoint, gpt2, llama
from robust_gate.hf.model import FAMILIES, Model

# Tokenizer files copied from the source checkpoint when it has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def tensors(model: Model) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint by its saved name, float32, in torch's layout."""
  spec = FAMILIES[model.family].spec(model.config)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), model.params)

  def stored(value: np.ndarray, t: checkpoint.Tensor) -> np.ndarray:
    value = np.ascontiguousarray(value.T if t.transpose else value)
    if value.shape != t.shape:
      raise InputError(
        f"parameter {t.name} has shape {list(value.shape)}; the model's config implies "
        f"{list(t.shape)}."
      )
    return value

  out = {spec.saved_name(t.name): stored(params[key], t) for key, t in spec.top.items()}
  for key, t in spec.layers.items():
    for i in range(spec.num_layers):
      out[spec.saved_name(t.name.format(i=i))] = stored(params["layers"][key][i], t)
  return out


def _source_json(model: Model, name: str) -> dict:
  """`name` of the directory the model was loaded from, or {} where there is none."""
  file = os.path.join(model.path, name)
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}


def _family_fields(model: Model) -> dict:
  """The config.json fields the family's `config_from_json` reads, from `model.config`."""
  c = model.config
  if isinstance(c, gpt2.Config):
    return {
      "vocab_size": c.vocab_size,
      "n_positions": c.max_len,
      "n_embd": c.d_model,
      "n_layer": c.num_layers,
      "n_head": c.num_heads,
      "n_inner": c.d_ff,
      "layer_norm_epsilon": c.eps,
      "activation_function": "gelu_new",
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "tie_word_embeddings": True,
      "add_cross_attention": False,
    }
  assert isinstance(c, llama.Config)
  # transformers ≥ 5 reads rope_parameters (θ inside), earlier versions rope_theta and,
  # for a scaled variant, rope_scaling (which transformers ≥ 5 reads first when there
  # is one): all written, all equal, so every version computes the same frequencies.
  scaling = {"rope_scaling": c.rope.scaling()} if c.rope.rope_type != "default" else {}
  return {
    "vocab_size": c.vocab_size,
    "hidden_size": c.d_model,
    "intermediate_size": c.d_ff,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "rms_norm_eps": c.eps,
    "rope_parameters": c.rope.parameters(),
    "rope_theta": c.rope.rope_theta,
    **scaling,
    "tie_word_embeddings": c.tied,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
  }


def config_json(model: Model) -> dict:
  """config.json of the exported checkpoint (see the module's docstring)."""
  config = _source_json(model, "config.json")
  config.pop("rope_scaling", None)  # written again from the model's Config where scaled
  # Llama 3's pre-training context is in the rope objects; transformers ≥ 5 would prefer
  # a top-level copy over them, and the model's Config may no longer match the source's.
  config.pop("original_max_position_embeddings", None)
  config.pop("torch_dtype", None)  # transformers < 5's name of "dtype"
  config.update(_family_fields(model))
  config.update(
    model_type=model.family, architectures=[ARCHITECTURES[model.family]], dtype="float32"
  )
  tok = model.tokenizer
  # A source's own BOS/EOS entries stay (Llama 3 lists several end tokens); absent ones
  # are written, so the directory does not depend on a generation_config.json.
  config.setdefault("bos_token_id", tok.bos_id)
  config.setdefault("eos_token_id", tok.eos_id)
  return config


def _tokenizer_config(model: Model) -> dict:
  backend, tok = model.tokenizer.backend, model.tokenizer
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": backend.id_to_token(tok.bos_id),
    "eos_token": backend.id_to_token(tok.eos_id),
    "model_max_length": model.config.max_len
    if isinstance(model.config, gpt2.Config)
    else int(_source_json(model, "config.json").get("max_position_embeddings", 2048)),
  }


def save(model: Model, directory: str) -> str:
  """Writes `model` as a checkpoint directory (replacing one already there whole:
  it is built beside it and renamed into place, so a crash leaves the old one or
  the new one; process 0 writes, the others return at once). Returns `directory`."""
  directory = os.path.abspath(directory)
  if not parallel.is_main():
    return directory
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    save_file(tensors(model), os.path.join(staging, checkpoint.SINGLE), metadata={"format": "pt"})
    _write_json(os.path.join(staging, "config.json"), config_json(model))
    generation = _source_json(model, "generation_config.json")
    if generation:
      _write_json(os.path.join(staging, "generation_config.json"), generation)
    source_dir = os.path.dirname(model.tokenizer.path)
    for name in TOKENIZER_FILES:
      source = model.tokenizer.path if name == "tokenizer.json" else os.path.join(source_dir, name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(staging, name))
    if not os.path.isfile(os.path.join(staging, "tokenizer_config.json")):
      _write_json(os.path.join(staging, "tokenizer_config.json"), _tokenizer_config(model))
    if os.path.isdir(directory):
      old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
      os.replace(directory, os.path.join(old, "checkpoint"))
      os.replace(staging, directory)
      shutil.rmtree(old)
    else:
      os.replace(staging, directory)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  return directory


def _write_json(path: str, value: dict) -> None:
  files.atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
