"""Pre-trained experts from local Hugging Face checkpoints (GPT-2, Llama), in JAX.

    import robust_gate.hf as hf
    experts, tok = hf.load_experts({"code": "ckpt/gpt2-code", "law": "ckpt/llama-law"})
    val = hf.tokenizer.encode_domains(tok, texts, labels, ["code", "law"],
                                      vocab_size=experts[0].vocab_size, max_len=256)

No PyTorch: the forward passes are written here from the architectures'
definitions, the weights read with safetensors' numpy API. `export.save(model, dir)` writes a
model back as a checkpoint transformers loads (the distilled student, for one);
`sharding` splits experts larger than a device over a mesh's model axis; `decode`
holds the key/value cache with which `decode_step` computes one position at a time
(sampling).
"""

from robust_gate.hf import (
  checkpoint,
  decode,
  export,
  gpt2,
  llama,
  sharding,
  tokenizer,
)
from robust_gate.hf.model import (
  DTYPES,
  FAMILIES,
  Model,
  decode_step,
  expert,
  expert_group,
  fingerprint,
  init_cache,
  load,
  load_expert,
  load_experts,
  load_models,
  next_token_logprobs,
  token_logprobs,
)

__all__ = [
  "DTYPES",
  "FAMILIES",
  "Model",
  "checkpoint",
  "decode",
  "decode_step",
  "expert",
  "expert_group",
  "export",
  "fingerprint",
  "gpt2",
  "init_cache",
  "llama",
  "load",
  "load_expert",
  "load_experts",
  "load_models",
  "next_token_logprobs",
  "sharding",
  "token_logprobs",
  "tokenizer",
]
