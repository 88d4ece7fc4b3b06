"""A checkpoint's own tokenizer (tokenizer.json), and its ids as the data's tokens.

The data layout (robust_gate.data) reserves token 0 for BOS and EOS. A checkpoint
has its own: GPT-2 ends text with <|endoftext|> (50256), Llama starts with <s> (1)
and ends with </s> (2), and its id 0 is an ordinary token. Data ids are the
checkpoint's ids with 0 and EOS swapped: the data's 0 is the checkpoint's EOS as a
target and its BOS as an input (`hf.model` maps both ways), the checkpoint's token
0 is the data's id `eos_id`, every other id is itself. The rest of the library
(sampling stops at 0, caches, gates) works unchanged, and experts that share a
tokenizer share data ids.

Experts can share a gate only if they share a tokenizer: `check_same` refuses two
that differ, naming what differs (vocabulary size, added or special tokens,
BOS/EOS, the vocabulary and merges, the text normalization).
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers

from robust_gate import data
from robust_gate.checks import InputError


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  path: str  # the tokenizer.json read
  size: int  # ids the tokenizer emits, added tokens included
  added: tuple[tuple[int, str, bool], ...]  # added tokens: (id, content, special)
  model_digest: str  # sha1 of the vocabulary and merges
  text_digest: str  # sha1 of the normalizer and pre-tokenizer: how text is split
  bos_id: int  # the checkpoint's start token (the data's input 0)
  eos_id: int  # the checkpoint's end token (the data's target 0)
  backend: tokenizers.Tokenizer = dataclasses.field(repr=False)


def _digest(value) -> str:
  return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _token_id(config: Mapping, key: str, file: str) -> int | None:
  """config[key] as one id; a list (several end tokens, as Llama 3 has) gives its first."""
  value = config.get(key)
  if isinstance(value, list) and value:
    value = value[0]
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
    raise InputError(f"{file}: {key}={config.get(key)!r} is not a token id.")
  return value


def _special_ids(path: str, config: Mapping) -> tuple[int, int]:
  """(BOS, EOS) from config.json, else generation_config.json; BOS defaults to EOS
  (GPT-2's convention: one token for both)."""
  sources = [(os.path.join(path, "config.json"), config)]
  generation = os.path.join(path, "generation_config.json")
  if os.path.isfile(generation):
    try:
      with open(generation) as f:
        sources.append((generation, json.load(f)))
    except (OSError, ValueError) as e:
      raise InputError(f"{generation} cannot be read as JSON: {e}") from None
  bos = eos = None
  for file, values in sources:
    bos = bos if bos is not None else _token_id(values, "bos_token_id", file)
    eos = eos if eos is not None else _token_id(values, "eos_token_id", file)
  if eos is None:
    raise InputError(
      f"checkpoint {path} names no eos_token_id (config.json, generation_config.json): "
      f"every sequence of the data ends with one."
    )
  return (eos if bos is None else bos), eos


def load(path: str, config: Mapping) -> Tokenizer:
  """The tokenizer of checkpoint directory `path` (`config`: its config.json)."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise InputError(f"checkpoint {path} has no tokenizer.json.")
  try:
    backend = tokenizers.Tokenizer.from_file(file)
    with open(file) as f:
      spec = json.load(f)
  except Exception as e:  # the Rust parser raises its own exception kinds
    raise InputError(f"{file} cannot be read as a tokenizer ({type(e).__name__}: {e}).") from None
  bos, eos = _special_ids(path, config)
  size = backend.get_vocab_size(with_added_tokens=True)
  for name, i in (("BOS", bos), ("EOS", eos)):
    if i >= size:
      raise InputError(f"checkpoint {path}: {name} id {i} is outside its {size} tokens.")
  added = tuple(
    sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", []))
  )
  return Tokenizer(
    path=file,
    size=size,
    added=added,
    model_digest=_digest(spec.get("model")),
    text_digest=_digest([spec.get("normalizer"), spec.get("pre_tokenizer")]),
    bos_id=bos,
    eos_id=eos,
    backend=backend,
  )


def swap_eos(ids, eos_id: int) -> np.ndarray:
  """Checkpoint ids ↔ data ids (0 and EOS exchanged; its own inverse)."""
  ids = np.asarray(ids)
  return np.where(ids == 0, eos_id, np.where(ids == eos_id, 0, ids))


def encode(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """Each text's data ids (no BOS or EOS: the data layout adds them)."""
  if isinstance(texts, str):
    raise InputError("texts must be a list of strings, not one string.")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise InputError(f"text {i} is a {type(text).__name__}, not a str.")
  sequences = []
  for i, e in enumerate(tok.backend.encode_batch(list(texts), add_special_tokens=False)):
    ids = np.asarray(e.ids, np.int64)
    if np.any(ids == tok.eos_id):
      raise InputError(
        f"text {i} contains the end-of-sequence token {tok.backend.id_to_token(tok.eos_id)!r} "
        f"(id {tok.eos_id}); the data layout adds it after every sequence."
      )
    sequences.append(swap_eos(ids, tok.eos_id).astype(np.int32))
  return sequences


def encode_domains(
  tok: Tokenizer,
  texts: Sequence[str],
  domain_N,
  domains: Sequence[str],
  vocab_size: int,
  max_len: int,
  truncate: bool = False,
) -> data.DomainData:
  """Texts as a DomainData in data ids; `vocab_size` is the experts' (their output
  layer can be wider than the tokenizer)."""
  return data.encode(encode(tok, texts), domain_N, domains, vocab_size, max_len, truncate)


def decode(tok: Tokenizer, ids_T, mask_T=None) -> str:
  """Data ids back to text, up to EOS (special tokens shown)."""
  ids = np.asarray(ids_T)
  keep = ids != 0 if mask_T is None else np.asarray(mask_T) & (ids != 0)
  return tok.backend.decode(swap_eos(ids[keep], tok.eos_id).tolist(), skip_special_tokens=False)


def check_same(named: Mapping[str, Tokenizer]) -> None:
  """InputError naming the first two experts whose tokenizers differ, and how."""
  aspects = {
    "vocabulary size": lambda t: t.size,
    "BOS/EOS ids": lambda t: (t.bos_id, t.eos_id),
    "added/special tokens": lambda t: t.added,
    "vocabulary and merges (digest)": lambda t: t.model_digest[:12],
    "normalizer and pre-tokenizer (digest)": lambda t: t.text_digest[:12],
  }
  (first, a), *rest = named.items()
  for name, b in rest:
    for aspect, get in aspects.items():
      if get(a) != get(b):
        mine, theirs = get(a), get(b)
        if aspect == "added/special tokens":  # long lists: only what differs
          mine, theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        raise InputError(
          f"experts {first!r} and {name!r} have different tokenizers: {aspect} "
          f"{mine} vs {theirs} ({a.path}, {b.path}); a gate mixes one vocabulary's distributions."
        )
