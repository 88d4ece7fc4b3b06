"""Writes tests/fixtures/hf: small random GPT-2 and Llama checkpoints with transformers'
own per-token log-probabilities, so tests/test_hf.py checks robust_gate.hf offline.

Runs in a separate environment with PyTorch and transformers (the project needs
neither):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers safetensors tokenizers numpy
    /tmp/hfvenv/bin/python launch/make_hf_fixtures.py

Every checkpoint directory holds what `save_pretrained` writes (config.json and
safetensors; `llama_untied` sharded, with model.safetensors.index.json), the one
tokenizer.json all three share (a byte-level BPE trained here on the standard
library's sources), and reference.npz: `ids_BxT` (token ids, BOS first and EOS
last), `logp_BxT`, transformers' float32 log p(ids[t + 1] | ids[≤ t]), and the
`versions` of torch and transformers that computed them.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

VOCAB = 384  # 256 bytes, 3 special tokens and 125 merges: small files
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; BOS = 1, EOS = 2
BOS, EOS = 1, 2
# Standard-library modules whose source trains the tokenizer: any fixed local text.
CORPUS = ("json/__init__.py", "textwrap.py", "string.py", "fractions.py", "heapq.py")
SEQUENCES, LENGTH = 3, 24  # reference ids: [BOS, 22 tokens, EOS]


def train_tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=VOCAB,
    special_tokens=SPECIAL,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  stdlib = Path(os.__file__).parent
  tok.train_from_iterator([(stdlib / name).read_text() for name in CORPUS], trainer)
  assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
  return tok


def model_configs() -> dict:
  """The three checkpoints. Weights are redrawn by `randomize`, so initializer
  options do not matter."""
  common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS)
  llama = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    max_position_embeddings=64,
    **common,
  )
  return {
    "gpt2": transformers.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, **common),
    "llama_tied": transformers.LlamaConfig(rope_theta=10000.0, tie_word_embeddings=True, **llama),
    # Another rope_theta: a loader that ignored it would fail on one of the two.
    "llama_untied": transformers.LlamaConfig(rope_theta=500.0, tie_word_embeddings=False, **llama),
  }


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter drawn anew, norms' scales around 1 and biases around 0: at
  transformers' initialization the next-token distributions are nearly uniform and
  many wrong forward passes would still agree with the right one to 1e-4."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif p.ndim == 1:
        p.copy_(0.3 * noise)
      else:  # weights: fan-in scaling, a little hotter than usual for sharp outputs
        p.copy_(noise * (2.0 / p.shape[-1] ** 0.5))


def reference_ids(seed: int) -> np.ndarray:
  """[BOS, x_1 .. x_22, EOS] rows; x drawn from every id but EOS, with <unk> (id 0)
  in each row, whose data id differs from its token id (robust_gate.hf.tokenizer)."""
  rng = np.random.default_rng(seed)
  body = rng.choice([i for i in range(VOCAB) if i != EOS], size=(SEQUENCES, LENGTH - 2))
  body[:, 5] = 0
  bos = np.full((SEQUENCES, 1), BOS)
  eos = np.full((SEQUENCES, 1), EOS)
  return np.concatenate([bos, body, eos], axis=1).astype(np.int64)


def reference_logprobs(model: torch.nn.Module, ids_BxT: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    logits = model(torch.from_numpy(ids_BxT[:, :-1])).logits.float()
  logp = torch.log_softmax(logits, dim=-1)
  return logp.gather(-1, torch.from_numpy(ids_BxT[:, 1:, None]))[..., 0].numpy()


def main(out: Path) -> None:
  torch.manual_seed(0)
  tok = train_tokenizer()
  ids_BxT = reference_ids(0)
  classes = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
  for i, (name, config) in enumerate(model_configs().items()):
    model = classes[config.model_type](config).float().eval()
    randomize(model, seed=i)
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    # Sharded: the loader reads model.safetensors.index.json too.
    shard = "100KB" if name == "llama_untied" else "50GB"
    model.save_pretrained(directory, max_shard_size=shard)
    tok.save(str(directory / "tokenizer.json"))
    logp_BxT = reference_logprobs(model, ids_BxT)
    np.savez(
      directory / "reference.npz",
      ids_BxT=ids_BxT,
      logp_BxT=logp_BxT,
      versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"),
    )
    print(f"{name}: per-token log-prob mean {logp_BxT.mean():.3f} sd {logp_BxT.std():.3f}")
  sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
  print(json.dumps(sizes, indent=1), f"{sum(sizes.values()) / 1e6:.2f} MB in {len(sizes)} files")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures/hf", help="where the checkpoints go")
  main(Path(parser.parse_args(sys.argv[1:]).out))
