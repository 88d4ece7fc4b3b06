"""Local text files per domain as the three splits of a checkpoint job, in the experts'
token ids (robust_gate.checkpoint_job).

Each domain names glob patterns of UTF-8 text files (a directory stands for every file
under it). Every file is encoded with the experts' shared tokenizer
(robust_gate.hf.tokenizer: data ids) and cut into consecutive chunks of max_len − 1
tokens (the data layout adds BOS and EOS); a last, shorter chunk is kept. A chunk's
split is a pure function of its content: the first bytes of sha1(domain, what is
hashed) as a number u ∈ [0, 1), test below `test`, validation below `test +
validation`, train above. `split_by="file"` hashes the file's bytes, so every chunk of
a file lands in one split (no passage of a test file was seen in training);
`"chunk"` hashes the chunk's tokens, finer, for domains of few files. Either way the
splits do not depend on the order files are listed or found in, nor on the other
files, and adding files moves no chunk between splits.
"""

import dataclasses
import glob
import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np

from robust_gate import data
from robust_gate.checks import InputError
from robust_gate.hf import tokenizer as tokenizer_lib
from robust_gate.records import Splits

SPLITS = ("train", "validation", "test")
SPLIT_BY = ("file", "chunk")


@dataclasses.dataclass(frozen=True)
class TextData:
  """What a job's config says about its data, typed."""

  files: Mapping[str, Sequence[str]]  # domain: glob patterns (or directories)
  max_len: int  # tokens per sequence, BOS/EOS included
  validation: float  # fraction of chunks (or files) in validation
  test: float  # and in test
  split_by: str = "file"  # "file" or "chunk": what the split's hash reads


def domain_files(domain: str, patterns: Sequence[str]) -> list[str]:
  """The files of `patterns`, sorted and without repeats; InputError when none match."""
  if isinstance(patterns, str):
    patterns = [patterns]
  found: set[str] = set()
  for pattern in patterns:
    for path in glob.glob(os.path.expanduser(pattern), recursive=True):
      if os.path.isdir(path):
        found |= {os.path.join(root, f) for root, _, names in os.walk(path) for f in names}
      elif os.path.isfile(path):
        found.add(path)
  if not found:
    raise InputError(f"config.data.files[{domain!r}]: no file matches {list(patterns)}.")
  return sorted(found)


def read_text(path: str) -> str:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise InputError(f"cannot read {path}: {e.strerror}.") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{path} is not UTF-8 text (byte {e.start}); list text files only.") from None


def _fraction(domain: str, content: bytes) -> float:
  """u ∈ [0, 1) from sha1(domain, content): the split's coin, the same on every machine."""
  digest = hashlib.sha1(domain.encode() + b"\0" + content).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(u: float, spec: TextData) -> int:
  """0 train, 1 validation, 2 test."""
  return 2 if u < spec.test else 1 if u < spec.test + spec.validation else 0


def chunks(ids: np.ndarray, length: int) -> list[np.ndarray]:
  return [ids[i : i + length] for i in range(0, len(ids), length)]


def check(spec: TextData) -> None:
  if spec.split_by not in SPLIT_BY:
    raise InputError(f"config.data.split_by={spec.split_by!r}: choose one of {SPLIT_BY}.")
  for name, value in (("validation", spec.validation), ("test", spec.test)):
    if not 0 < value < 1:
      raise InputError(f"config.data.{name}={value} must be a fraction in (0, 1).")
  if spec.validation + spec.test >= 1:
    raise InputError("config.data.validation + config.data.test leave no training data.")
  if spec.max_len < 2:
    raise InputError(f"config.data.max_len={spec.max_len}: at least 2 (BOS/EOS and a token).")


def load_splits(
  spec: TextData, domains: Sequence[str], tok: tokenizer_lib.Tokenizer, vocab_size: int
) -> Splits:
  """The three splits of `domains` (in that order: domain k is expert k's)."""
  check(spec)
  missing = [d for d in domains if d not in spec.files]
  if missing:
    raise InputError(f"config.data.files has no files for the experts {missing}.")
  extra = [d for d in spec.files if d not in domains]
  if extra:
    raise InputError(f"config.data.files names {extra}, which config.experts does not have.")
  seqs: list[list[np.ndarray]] = [[], [], []]
  labels: list[list[int]] = [[], [], []]
  for k, domain in enumerate(domains):
    for path in domain_files(domain, spec.files[domain]):
      text = read_text(path)
      try:
        (ids,) = tokenizer_lib.encode(tok, [text])
      except InputError as e:
        raise InputError(f"{path}: {e}") from None
      file_u = _fraction(domain, text.encode())
      for piece in chunks(ids, spec.max_len - 1):
        u = file_u if spec.split_by == "file" else _fraction(domain, piece.tobytes())
        s = split_of(u, spec)
        seqs[s].append(piece)
        labels[s].append(k)
  for s, split in enumerate(SPLITS):
    have = set(labels[s])
    empty = [d for k, d in enumerate(domains) if k not in have]
    if empty:
      hint = " or split_by='chunk'" if spec.split_by == "file" else ""
      raise InputError(
        f"domain(s) {empty} have no {split} data: give them more text{hint} "
        f"(config.data.validation={spec.validation}, test={spec.test})."
      )
  return Splits(
    *(
      data.encode(seqs[s], np.asarray(labels[s]), list(domains), vocab_size, spec.max_len)
      for s in range(3)
    )
  )
