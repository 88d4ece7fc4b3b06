"""Writes tests/fixtures/hf: small random GPT-2 and Llama checkpoints with transformers'
own per-token log-probabilities, so tests/test_hf.py checks robust_gate.hf offline.

Runs in a separate environment with PyTorch and transformers (the project needs
neither):

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers safetensors tokenizers numpy
    /tmp/hfvenv/bin/python launch/make_hf_fixtures.py
    # only some, leaving the others' files as they are:
    /tmp/hfvenv/bin/python launch/make_hf_fixtures.py --only llama_rope_llama3,llama_rope_linear

Every checkpoint directory holds what `save_pretrained` writes (config.json and
safetensors; `llama_untied` sharded, with model.safetensors.index.json), the one
tokenizer.json they all share (a byte-level BPE trained here on the standard
library's sources), and reference.npz: `ids_BxT` (token ids, BOS first and EOS
last), `logp_BxT`, transformers' float32 log p(ids[t + 1] | ids[≤ t]), and the
`versions` of torch and transformers that computed them. Each checkpoint's weights
depend only on its place in `model_configs` (its seed), so writing some of them
gives the files a full run would.
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


# The scaled rotary embeddings (robust_gate.hf.llama.Rope), θ = 10000 and head_dim 16:
# wavelengths 2π·10^(i/2) = 6.3, 19.9, 62.8, 199, ... Linear divides every frequency
# by 4; llama3 with a pre-training context of 128 and the band [128/8, 128] keeps the
# first, mixes the next two (s = 0.78 and 0.15) and divides the other five by 8.
ROPE_SCALING = {
  "llama_rope_llama3": dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=8.0,
    original_max_position_embeddings=128,
  ),
  "llama_rope_linear": dict(rope_type="linear", factor=4.0),
}


def model_configs(rope: bool = True) -> dict:
  """The checkpoints, in seed order (new ones go last); `rope=False` gives the
  scaled-rope ones the default rotary embedding instead (the same weights, to show
  that the scaling changes the log-probs). Weights are redrawn by `randomize`, so
  initializer options do not matter."""
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
  configs = {
    "gpt2": transformers.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4, **common),
    "llama_tied": transformers.LlamaConfig(rope_theta=10000.0, tie_word_embeddings=True, **llama),
    # Another rope_theta: a loader that ignored it would fail on one of the two.
    "llama_untied": transformers.LlamaConfig(rope_theta=500.0, tie_word_embeddings=False, **llama),
  }
  for name, scaling in ROPE_SCALING.items():
    # rope_scaling + rope_theta: what transformers 4.4x reads, and 5.x converts.
    scaled = {"rope_scaling": dict(scaling)} if rope else {}
    configs[name] = transformers.LlamaConfig(
      rope_theta=10000.0,
      tie_word_embeddings=False,
      **scaled,
      **(llama | dict(max_position_embeddings=512)),  # above the pre-training context
    )
  return configs


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


def logprobs_of(config, seed: int, ids_BxT: np.ndarray) -> tuple[torch.nn.Module, np.ndarray]:
  """The checkpoint of `config` with weights drawn from `seed`, and its reference log-probs."""
  classes = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
  model = classes[config.model_type](config).float().eval()
  randomize(model, seed=seed)
  return model, reference_logprobs(model, ids_BxT)


def main(out: Path, only: list[str] | None) -> None:
  configs = model_configs()
  unknown = sorted(set(only or []) - set(configs))
  if unknown:
    raise SystemExit(f"--only: unknown checkpoints {unknown}; known: {', '.join(configs)}")
  torch.manual_seed(0)
  tok = train_tokenizer()
  ids_BxT = reference_ids(0)
  for i, (name, config) in enumerate(configs.items()):
    if only and name not in only:
      continue
    model, logp_BxT = logprobs_of(config, i, ids_BxT)
    if name in ROPE_SCALING:
      assert model.model.rotary_emb.rope_type == ROPE_SCALING[name]["rope_type"], name
      _, default_BxT = logprobs_of(model_configs(rope=False)[name], i, ids_BxT)
      change = np.abs(logp_BxT - default_BxT).max()
      print(f"{name}: max |Δ log-prob| against the default rotary embedding {change:.3f}")
      assert change > 0.05, "the scaling should visibly change the log-probs"
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    # Sharded: the loader reads model.safetensors.index.json too.
    shard = "100KB" if name == "llama_untied" else "50GB"
    model.save_pretrained(directory, max_shard_size=shard)
    tok.save(str(directory / "tokenizer.json"))
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
  parser.add_argument(
    "--only", default="", help="comma-separated checkpoint names to write (default: all)"
  )
  args = parser.parse_args(sys.argv[1:])
  main(Path(args.out), [n for n in args.only.split(",") if n] or None)
