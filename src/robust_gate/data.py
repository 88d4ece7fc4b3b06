"""Domain-labelled token sequences: loading, encoding, validation, sampling.

`DomainData` holds one split in memory as fixed-shape arrays, ready for jit:

    inputs_NxT  [BOS, x_1 .. x_n, 0 ...]     BOS = EOS = 0
    targets_NxT [x_1 .. x_n, EOS, 0 ...]
    mask_NxT    True on the n + 1 real targets
    domain_N    int domain index; `domains` names them

Sources: the local TFDS builders of `robust_gate.datasets`, or any TFDS dataset
by name with a text (UTF-8 → bytes) or token feature and a domain key.
Sampling is stratified inside jit: `stratified_batch(key, index, B)` draws B
examples of every domain without host round trips.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import checks, parallel
from robust_gate.checks import InputError

BOS = EOS = 0
BYTE_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class DomainData:
  inputs_NxT: np.ndarray
  targets_NxT: np.ndarray
  mask_NxT: np.ndarray
  domain_N: np.ndarray
  domains: tuple
  vocab_size: int

  @property
  def num_domains(self) -> int:
    return len(self.domains)

  def counts(self) -> np.ndarray:
    return np.bincount(self.domain_N, minlength=self.num_domains)

  def fingerprint(self) -> str:
    """A digest of the arrays and domain names: caches are tied to it."""
    h = hashlib.sha1()
    for a in (self.inputs_NxT, self.targets_NxT, self.mask_NxT, self.domain_N):
      h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr((self.domains, self.vocab_size)).encode())
    return h.hexdigest()

  def subset(self, idx) -> "DomainData":
    return dataclasses.replace(
      self,
      inputs_NxT=self.inputs_NxT[idx],
      targets_NxT=self.targets_NxT[idx],
      mask_NxT=self.mask_NxT[idx],
      domain_N=self.domain_N[idx],
    )


def encode(
  sequences: Sequence[np.ndarray],
  domain_N,
  domains: Sequence[str],
  vocab_size: int,
  max_len: int,
  truncate: bool = False,
  first: int = 0,
  every_domain: bool = True,
) -> DomainData:
  """Encodes token sequences (values in 1..vocab_size−1) into a DomainData.

  Raises InputError for empty sequences, tokens that are not integers or lie
  outside the vocabulary, sequences longer than `max_len − 1` (they need BOS/EOS
  room) unless `truncate` crops them (then the last target is a token, not EOS),
  labels that are not integers or lie outside the domain list, repeated domain
  names, and (with `every_domain`) domains without examples. Values are checked before
  any cast, so a NaN or 1.7 is an error, not a token. Messages number the sequences from
  `first` (a block of a larger split).
  """
  vocab_size = checks.check_int(vocab_size, "vocab_size", 2, 2**31)  # tokens are int32
  max_len = checks.check_int(max_len, "max_len", 2)
  domains = _check_domain_names(domains)
  labels = _integer_array(domain_N, "domain_N", "domain label")
  if labels.ndim != 1:
    raise InputError(f"domain_N has shape {labels.shape}: one label per sequence.")
  if len(sequences) != len(labels):
    raise InputError(f"{len(sequences)} sequences but {len(labels)} domain labels.")
  bad = np.flatnonzero((labels < 0) | (labels >= len(domains)))
  if bad.size:
    raise InputError(
      f"example {first + bad[0]} has domain label {labels[bad[0]]}, outside "
      f"the {len(domains)} domains {list(domains)}."
    )
  domain_N = labels.astype(np.int32)
  N, T = len(sequences), max_len
  inputs = np.zeros((N, T), np.int32)
  targets = np.zeros((N, T), np.int32)
  mask = np.zeros((N, T), bool)
  for i, seq in enumerate(sequences):
    seq = _integer_array(seq, f"example {first + i}", "token")
    if seq.ndim != 1:
      raise InputError(
        f"example {first + i} has shape {seq.shape}: a sequence is a 1-D array of tokens."
      )
    if seq.size == 0:
      raise InputError(f"example {first + i} (domain {domains[domain_N[i]]!r}) is empty.")
    if seq.size > T - 1 and truncate:
      seq = seq[:T]
    elif seq.size > T - 1:
      raise InputError(
        f"example {first + i} has {seq.size} tokens; the context holds {T - 1} plus BOS/EOS "
        f"(max_len={T})."
      )
    if seq.min() < 1 or seq.max() >= vocab_size:
      raise InputError(
        f"example {first + i} has token {seq.min() if seq.min() < 1 else seq.max()} "
        f"outside the vocabulary 1..{vocab_size - 1} (0 is BOS/EOS)."
      )
    n = seq.size
    if n == T:  # truncated: no room for EOS, the last token is the last target
      inputs[i, 1:] = seq[:-1]
      targets[i] = seq
      mask[i] = True
    else:
      inputs[i, 1 : n + 1] = seq
      targets[i, :n] = seq
      mask[i, : n + 1] = True
  data = DomainData(inputs, targets, mask, domain_N, domains, vocab_size)
  empty = np.flatnonzero(data.counts() == 0)
  if every_domain and empty.size:
    raise InputError(f"domain {domains[empty[0]]!r} has no examples.")
  return data


def _check_domain_names(domains: Sequence[str]) -> tuple:
  """The domain names as a tuple of distinct, non-empty strings."""
  if isinstance(domains, str):
    raise InputError(f"domains={domains!r} must be a list of names, not one string.")
  domains = tuple(domains)
  if not domains:
    raise InputError("the domain list is empty.")
  for name in domains:
    if not isinstance(name, str) or not name:
      raise InputError(f"domain name {name!r} in {list(domains)} must be a non-empty string.")
  repeated = sorted({d for d in domains if domains.count(d) > 1})
  if repeated:
    raise InputError(f"domain names {list(domains)} repeat {repeated}: each domain needs its own.")
  return domains


def _integer_array(values, name: str, what: str) -> np.ndarray:
  """`values` as a numpy array of an integer dtype; floats (even 1.0), NaN, bools
  and strings are refused rather than cast."""
  try:
    arr = np.asarray(values)
  except ValueError as e:  # ragged nested lists
    raise InputError(f"{name} is not an array of {what}s: {e}") from None
  if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
    flat = arr.reshape(-1)
    i = 0
    if np.issubdtype(arr.dtype, np.floating):  # show a value that is not a whole number
      i = int(np.argmax(~np.isfinite(flat) | (flat != np.trunc(flat))))
    raise InputError(
      f"{name} holds {arr.dtype} values such as {flat[i : i + 1].tolist()[0]!r}: "
      f"each {what} must be an integer."
    )
  return arr


def text_to_tokens(text, index: int = 0) -> np.ndarray:
  """UTF-8 bytes of a str (or bytes that must be valid UTF-8), as tokens."""
  raw = text if isinstance(text, bytes) else str(text).encode("utf-8")
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"example {index} is not valid UTF-8 ({e}).") from None
  tokens = np.frombuffer(raw, np.uint8).astype(np.int32)
  if np.any(tokens == 0):
    raise InputError(f"example {index} contains a NUL byte, reserved for BOS/EOS.")
  return tokens


def tokens_to_text(tokens_T, mask_T=None) -> str:
  """Byte tokens back to text (up to EOS; invalid UTF-8 shown as U+FFFD)."""
  tokens = np.asarray(tokens_T)
  keep = tokens != EOS if mask_T is None else np.asarray(mask_T) & (tokens != EOS)
  return bytes(tokens[keep].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def from_data_source(
  source,
  *,
  domains: Sequence[str],
  vocab_size: int,
  max_len: int,
  text_key: str | None = None,
  tokens_key: str | None = "tokens",
  domain_key: str = "domain",
  truncate: bool = False,
  first: int = 0,
  every_domain: bool = True,
) -> DomainData:
  """Reads a random-access TFDS data source (or any list of dicts) with `encode`; its
  examples are numbered from `first` in messages (a block of a larger source)."""
  if len(source) == 0:
    raise InputError("the dataset split is empty.")
  names = list(_check_domain_names(domains))
  seqs, labels = [], []
  feature = text_key if text_key is not None else tokens_key
  for i, ex in enumerate(_examples(source)):
    for key in (domain_key, feature):
      if key not in ex:
        raise InputError(f"example {first + i} has no key {key!r}; keys: {sorted(ex)}.")
    label = ex[domain_key]
    if isinstance(label, (bytes, str)):
      label = label.decode() if isinstance(label, bytes) else label
      if label not in names:
        raise InputError(
          f"example {first + i} has domain {label!r}, not in the domain list {names}."
        )
      label = names.index(label)
    labels.append(label)  # encode checks it is an integer in range
    seqs.append(text_to_tokens(ex[feature], first + i) if text_key is not None else ex[feature])
  return encode(seqs, labels, names, vocab_size, max_len, truncate, first, every_domain)


_READ_CHUNK = 1024  # examples per batched read of a data source


def _examples(source) -> Iterator[Any]:
  """The examples of a random-access source in order, read `_READ_CHUNK` at a time through
  `__getitems__` where the source has it (tfds's array_record sources read such a batch
  in parallel; one `source[i]` at a time is a read call per record), else one by one."""
  many = getattr(source, "__getitems__", None)
  for lo in range(0, len(source), _READ_CHUNK):
    idx = range(lo, min(len(source), lo + _READ_CHUNK))
    yield from (many(list(idx)) if many is not None else (source[i] for i in idx))


def load_local(
  name: str,
  split: str,
  data_dir: str,
  max_len: int,
  log: Callable[[str], None] = print,
  **builder_overrides,
) -> DomainData:
  """Prepares (once) and loads a split of a local dataset (robust_gate.datasets) into
  memory; `read_local` says what happens to a damaged one."""
  return read_local(
    name,
    split,
    data_dir,
    lambda examples, domains, vocab: from_data_source(
      examples, domains=domains, vocab_size=vocab, max_len=max_len
    ),
    log=log,
    **builder_overrides,
  )


def read_local(
  name: str,
  split: str,
  data_dir: str,
  read: Callable[[Any, Sequence[str], int], Any],
  log: Callable[[str], None] = print,
  **builder_overrides,
):
  """`read(examples, domains, vocab_size)` of a split of a local dataset
  (robust_gate.datasets), prepared once under `data_dir`; `examples` gives random
  access (len() and [i]) to the prepared examples, read as `read` asks for them.

  A prepared dataset whose read fails with evidence of damage (`_damage`) is announced,
  deleted and prepared again by process 0 (made from installed packages: nothing is
  lost), and `read` called again; other failures delete nothing: one line (OSError,
  array_record's errors) or a traceback (a bug). Process 0 reads first, the others
  after a barrier (pipeline.load_splits).
  """
  from robust_gate import datasets

  prepared = datasets.prepared_dir(name, data_dir, **builder_overrides)  # checks the options
  existed = os.path.isdir(prepared)
  try:
    return _read_local(name, split, data_dir, log, builder_overrides, read)
  except InputError:
    raise
  except Exception as e:
    damage = _damage(e, prepared, split) if existed else None
    if damage is None and (not existed or not isinstance(e, (OSError, RuntimeError))):
      raise  # a preparation made now failed (a bug or the system), or a bug
    if damage is None or not parallel.is_main():  # never delete what others may read
      why = "no sign of damage" if damage is None else "process 0 read it; only it rebuilds"
      raise InputError(
        f"{name}: cannot read the prepared dataset {prepared} ({damage or _first_line(e)}); "
        f"left as it is ({why}): run again once the filesystem is healthy and no other job "
        f"changes it, or delete {prepared} to prepare it again."
      ) from e
    log(f"{name}: the prepared dataset {prepared} is damaged ({damage}); preparing it again.")
    shutil.rmtree(prepared)
    return _read_local(name, split, data_dir, log, builder_overrides, read)


def _read_local(name, split, data_dir, log, overrides, read):
  """`read` of a local dataset's split, prepared if it is not yet (no damage checks)."""
  from robust_gate import datasets

  builder = datasets.build(name, data_dir, log=log, **overrides)
  source = builder.as_data_source(split)
  domains = builder.info.features["domain"].names
  vocab = BYTE_VOCAB if name in ("wordfreq", "source") else _token_vocab(name, builder)
  return read(source, domains, vocab)


def blocks(
  examples, *, domains: Sequence[str], vocab_size: int, max_len: int, rows: int
) -> Iterator[DomainData]:
  """The examples of a random-access source (`from_data_source`'s) as DomainData blocks
  of `rows` sequences, in order, each read only when it is asked for."""
  if len(examples) == 0:
    raise InputError("the dataset split is empty.")
  counts = np.zeros(len(domains), np.int64)
  for lo in range(0, len(examples), rows):
    part = _Rows(examples, lo, min(len(examples), lo + rows))
    block = from_data_source(
      part, domains=domains, vocab_size=vocab_size, max_len=max_len, first=lo, every_domain=False
    )
    counts += block.counts()
    yield block
  if np.any(counts == 0):  # raised before the caller has taken the split as written
    raise InputError(f"domain {domains[int(np.argmin(counts))]!r} has no examples.")


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Examples lo..hi−1 of a random-access source, numbered from 0."""

  source: Any
  lo: int
  hi: int

  def __len__(self) -> int:
    return self.hi - self.lo

  def __getitem__(self, i: int):
    return self.source[self.lo + i]

  def __getitems__(self, idx: Sequence[int]) -> list:
    """Examples `idx` (numbered from 0) in one batched read where the source has one."""
    keys = [self.lo + i for i in idx]
    many = getattr(self.source, "__getitems__", None)
    return list(many(keys)) if many is not None else [self.source[k] for k in keys]


# array_record raises RuntimeError for damage and I/O errors alike. Damage: a record file
# failing a checksum or its format, cut below the format's size, missing, or holding fewer
# records than dataset_info.json counts. An I/O error ("read failed: errno=5") is none.
_DAMAGED_RECORDS = ("Riegeli/records file", "should be at least", "No such file", "out of bound")


def _damage(error: Exception, prepared: str, split: str) -> str | None:
  """The evidence that `error`, raised reading a prepared dataset, comes from damaged
  files, or None. Its dataset_info.json is checked here (TFDS's errors for it range
  from KeyError to protobuf's ParseError); an I/O error reading it is no evidence."""
  path = os.path.join(prepared, "dataset_info.json")
  try:
    with open(path, "rb") as f:
      info = json.loads(f.read().decode("utf-8"))
  except (FileNotFoundError, ValueError) as e:  # ValueError: not UTF-8, or not JSON
    return f"{path} {'is missing' if isinstance(e, OSError) else 'does not parse'}"
  except OSError:
    return None
  splits = info.get("splits") if isinstance(info, dict) else None
  names = [s.get("name") for s in splits if isinstance(s, dict)] if isinstance(splits, list) else []
  if split not in names:
    return f"{path} lists no split {split!r}"
  if isinstance(error, RuntimeError) and any(m in str(error) for m in _DAMAGED_RECORDS):
    return _first_line(error)
  return None


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _token_vocab(name, builder) -> int:
  c = builder.builder_config
  return 18 if name == "digits" else c.num_states + 1


def load_catalog(
  name: str,
  split: str,
  *,
  text_key: str,
  domain_key: str,
  max_len: int,
  data_dir: str | None = None,
  domains: Sequence[str] | None = None,
  max_examples: int | None = None,
  truncate: bool = True,
) -> DomainData:
  """Loads any TFDS catalog dataset by name: a text feature and a domain key.

  Text is encoded as UTF-8 bytes (vocabulary 256), cropped to the context
  unless `truncate=False` (then a longer text is an error). The domain names
  come from the domain feature's ClassLabel names unless `domains` is given.
  The dataset must be prepared (with file_format="array_record"); one that
  cannot be read (not prepared, or damaged) is an InputError naming its directory.
  """
  import tensorflow_datasets as tfds  # lazily: the library runs without it

  if max_examples is not None:
    checks.check_int(max_examples, "max_examples")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise InputError(_first_line(e)) from None
  for key in (text_key, domain_key):
    if key not in builder.info.features:
      raise InputError(f"{name} has no feature {key!r}; features: {sorted(builder.info.features)}.")
  feature = builder.info.features[domain_key]
  if domains is None:
    if not hasattr(feature, "names"):
      raise InputError(
        f"{name}: feature {domain_key!r} is not a ClassLabel; pass the domain list explicitly."
      )
    domains = feature.names
  try:
    source = builder.as_data_source(split)
    limit = len(source) if max_examples is None else min(max_examples, len(source))
    examples = [source[i] for i in range(limit)]
  except Exception as e:
    raise InputError(
      f"TFDS dataset {name!r} in {builder.data_dir} cannot be read ({_first_line(e)}); "
      f"if it is damaged, delete that directory and prepare the dataset again "
      f"(file_format='array_record')."
    ) from e
  return from_data_source(
    examples,
    domains=domains,
    vocab_size=BYTE_VOCAB,
    max_len=max_len,
    text_key=text_key,
    domain_key=domain_key,
    truncate=truncate,
  )


@dataclasses.dataclass(frozen=True)
class DomainIndex:
  """Examples sorted by domain, for stratified sampling inside jit (a pytree)."""

  order_N: jax.Array  # example indices sorted by domain
  offset_K: jax.Array  # start of each domain in order_N
  count_K: jax.Array  # examples of each domain


jax.tree_util.register_dataclass(
  DomainIndex, data_fields=["order_N", "offset_K", "count_K"], meta_fields=[]
)


def domain_index(data: DomainData) -> DomainIndex:
  order = np.argsort(data.domain_N, kind="stable").astype(np.int32)
  counts = data.counts().astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return DomainIndex(jnp.asarray(order), jnp.asarray(offsets), jnp.asarray(counts))


def stratified_batch(key: jax.Array, index: DomainIndex, per_domain: int) -> jax.Array:
  """Indices of `per_domain` examples of every domain (with replacement), [K, B]."""
  K = index.count_K.shape[0]
  u_KxB = jax.random.uniform(key, (K, per_domain))
  pos_KxB = jnp.minimum(
    (u_KxB * index.count_K[:, None]).astype(jnp.int32), index.count_K[:, None] - 1
  )
  return index.order_N[index.offset_K[:, None] + pos_KxB]
