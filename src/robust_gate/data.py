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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
) -> DomainData:
  """Encodes token sequences (values in 1..vocab_size−1) into a DomainData.

  Raises InputError for empty sequences, tokens outside the vocabulary,
  sequences longer than `max_len − 1` (they need BOS/EOS room) unless
  `truncate` crops them (then the last target is a token, not EOS), labels
  outside the domain list, and domains without examples.
  """
  domains = tuple(domains)
  if not domains:
    raise InputError("the domain list is empty.")
  domain_N = np.asarray(domain_N, np.int32)
  if len(sequences) != len(domain_N):
    raise InputError(f"{len(sequences)} sequences but {len(domain_N)} domain labels.")
  bad = np.flatnonzero((domain_N < 0) | (domain_N >= len(domains)))
  if bad.size:
    raise InputError(
      f"example {bad[0]} has domain label {domain_N[bad[0]]}, outside "
      f"the {len(domains)} domains {list(domains)}."
    )
  N, T = len(sequences), max_len
  inputs = np.zeros((N, T), np.int32)
  targets = np.zeros((N, T), np.int32)
  mask = np.zeros((N, T), bool)
  for i, seq in enumerate(sequences):
    seq = np.asarray(seq)
    if seq.size == 0:
      raise InputError(f"example {i} (domain {domains[domain_N[i]]!r}) is empty.")
    if seq.size > T - 1 and truncate:
      seq = seq[:T]
    elif seq.size > T - 1:
      raise InputError(
        f"example {i} has {seq.size} tokens; the context holds {T - 1} plus BOS/EOS (max_len={T})."
      )
    if seq.min() < 1 or seq.max() >= vocab_size:
      raise InputError(
        f"example {i} has token {seq.min() if seq.min() < 1 else seq.max()} "
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
  if empty.size:
    raise InputError(f"domain {domains[empty[0]]!r} has no examples.")
  return data


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
) -> DomainData:
  """Reads a random-access TFDS data source (or any list of dicts)."""
  if len(source) == 0:
    raise InputError("the dataset split is empty.")
  names = list(domains)
  seqs, labels = [], []
  for i in range(len(source)):
    ex = source[i]
    if domain_key not in ex:
      raise InputError(f"example {i} has no domain key {domain_key!r}; keys: {sorted(ex)}.")
    label = ex[domain_key]
    if isinstance(label, (bytes, str)):
      label = label.decode() if isinstance(label, bytes) else label
      if label not in names:
        raise InputError(f"example {i} has domain {label!r}, not in the domain list {names}.")
      label = names.index(label)
    labels.append(int(label))
    if text_key is not None:
      seqs.append(text_to_tokens(ex[text_key], i))
    else:
      seqs.append(np.asarray(ex[tokens_key], np.int32))
  return encode(seqs, labels, names, vocab_size, max_len, truncate)


def load_local(
  name: str, split: str, data_dir: str, max_len: int, **builder_overrides
) -> DomainData:
  """Builds (once) and loads a split of a local dataset (robust_gate.datasets)."""
  from robust_gate import datasets

  builder = datasets.build(name, data_dir, **builder_overrides)
  domains = builder.info.features["domain"].names
  vocab = BYTE_VOCAB if name == "wordfreq" else _token_vocab(name, builder)
  return from_data_source(
    builder.as_data_source(split), domains=domains, vocab_size=vocab, max_len=max_len
  )


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
  """
  import tensorflow_datasets as tfds  # lazily: the library runs without it

  builder = tfds.builder(name, data_dir=data_dir)
  feature = builder.info.features[domain_key]
  if domains is None:
    if not hasattr(feature, "names"):
      raise InputError(
        f"{name}: feature {domain_key!r} is not a ClassLabel; pass the domain list explicitly."
      )
    domains = feature.names
  source = builder.as_data_source(split)
  if max_examples is not None:
    source = [source[i] for i in range(min(max_examples, len(source)))]
  return from_data_source(
    source,
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
