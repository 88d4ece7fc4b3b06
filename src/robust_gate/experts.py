"""Experts as pure functions, and the cache of their log-probabilities (docs/math.md §1, §2.1).

An `Expert` is any jittable pure function of (inputs_BxT, targets_BxT) returning
log p(target_t | x_≤t): shape [B, T] for one model, or [B, T, m] for a group of
m models computed as one program (the stacked transformers). Experts of any
kind plug in this way; all must share the data's vocabulary.

`build_cache` scores every expert once over a dataset, `[N, T, M]`, validates
it, and `save_cache` / `load_cache` tie the file to a fingerprint of the data
and the experts so a cache cannot be used with other data. `load_cache` validates
what it reads as `build_cache` validates what it writes, so `cached_scores`
rebuilds a damaged file (announced) instead of crashing on it or trusting it.

A cache larger than memory (`sharded_scores`) is scored, validated and written one
row shard at a time (robust_gate.shards: a manifest with the fingerprint and every
shard's digest; resumable; a damaged shard announced and rebuilt) and read back by
row through memory maps. `stored_scores` picks between the two by a budget in bytes.
"""

import dataclasses
import functools
import hashlib
import io
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import checks, closures, files, models, parallel, shards
from robust_gate.checks import InputError
from robust_gate.data import DomainData


@dataclasses.dataclass(frozen=True)
class Expert:
  names: tuple  # one name per model in this expert (group)
  vocab_size: int
  logprob_fn: Callable  # (inputs_BxT, targets_BxT) -> [B, T] or [B, T, m]
  fingerprint: str = ""  # identifies the parameters (for cache checks)


def transformer_experts(config: models.LMConfig, params_M, names: Sequence[str]) -> Expert:
  """Stacked TransformerLM experts as one Expert group."""
  models.check_params(config, params_M, num_models=len(names))
  return Expert(
    names=tuple(names),
    vocab_size=config.vocab_size,
    logprob_fn=lambda x, y: models.stacked_token_logprobs(config, params_M, x, y),
    fingerprint=params_fingerprint(params_M),
  )


def params_fingerprint(params) -> str:
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def num_params(params) -> int:
  """The number of parameters (scalars) in a pytree of arrays."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def check_vocabularies(experts: Sequence[Expert], data: DomainData) -> None:
  vocabs = [(e.names, e.vocab_size) for e in experts]
  if len({v for _, v in vocabs}) > 1:
    raise InputError(
      f"experts' vocabularies differ: {vocabs}; a gate mixes "
      f"next-token distributions over one vocabulary."
    )
  vocab = vocabs[0][1]
  if vocab != data.vocab_size:
    raise InputError(f"experts have vocabulary size {vocab} but the data has {data.vocab_size}.")


@functools.lru_cache(maxsize=8)
def _scorer(experts: tuple):
  """One batch [B, T] scored by every expert, [B, T, M] float32 (the same function
  object per group of experts, so `closures.hoist` traces it once per batch shape)."""

  def one(x_BxT, y_BxT):
    outs = [e.logprob_fn(x_BxT, y_BxT) for e in experts]
    return jnp.concatenate([o[..., None] if o.ndim == 2 else o for o in outs], axis=-1).astype(
      jnp.float32
    )

  return one


@functools.partial(jax.jit, static_argnames="one")
def _score_batches(one: closures.Hoisted, consts, x_CxBxT, y_CxBxT):
  """`one` over [C, B, T] batches with `lax.map`; the experts' parameters (`consts`)
  are arguments of the program, not constants compiled into it."""
  return jax.lax.map(lambda xy: one(consts, *xy), (x_CxBxT, y_CxBxT))


def build_cache(
  experts: Sequence[Expert], data: DomainData, batch_size: int = 512, batches_per_call: int = 16
) -> np.ndarray:
  """log p_j(target_t | x_≤t) of every expert on every example, [N, T, M].

  Every expert scores `batches_per_call` batches in one compiled program
  (`lax.map` over batches, each batch split over the devices); the calls are
  dispatched back to back and their results copied to the host at the end, so
  host transfers overlap the compute instead of stalling each batch.
  """
  if not experts:
    raise InputError("no experts given (M = 0).")
  check_vocabularies(experts, data)

  score = _scorer(tuple(experts))
  N, T = data.inputs_NxT.shape
  batch_size += -batch_size % jax.device_count()  # split evenly over the devices
  calls = -(-N // (batch_size * batches_per_call))
  per_call = -(-N // (calls * batch_size))  # batches per call, as few as the data needs
  pad = calls * per_call * batch_size - N  # one compiled shape: pad the last batch
  shape = (calls, per_call, batch_size, T)
  inputs = np.pad(data.inputs_NxT, ((0, pad), (0, 0))).reshape(shape)
  targets = np.pad(data.targets_NxT, ((0, pad), (0, 0))).reshape(shape)
  batch = jax.ShapeDtypeStruct((batch_size, T), inputs.dtype)
  one, consts = closures.hoist(score, batch, batch)
  outs = [
    _score_batches(one, consts, parallel.put(inputs[c], axis=1), parallel.put(targets[c], axis=1))
    for c in range(calls)
  ]
  cache = np.concatenate([parallel.fetch(o).reshape(per_call * batch_size, T, -1) for o in outs])[
    :N
  ]
  names = sum((e.names for e in experts), ())
  if cache.shape[-1] != len(names):
    raise InputError(
      f"experts returned {cache.shape[-1]} log-prob columns for {len(names)} names {names}."
    )
  cache = np.where(data.mask_NxT[..., None], cache, 0.0).astype(np.float32)
  checks.check_token_logprobs(cache, data.mask_NxT, name="expert cache")
  return cache


def cache_fingerprint(data: DomainData, experts: Sequence[Expert]) -> str:
  return hashlib.sha1(
    (data.fingerprint() + "|".join(e.fingerprint + repr(e.names) for e in experts)).encode()
  ).hexdigest()


def save_cache(path: str, cache: np.ndarray, fingerprint: str) -> None:
  """Writes atomically: a crash leaves the old file or none, never half of one."""
  buffer = io.BytesIO()
  np.savez(buffer, cache=cache, fingerprint=np.array(fingerprint))
  files.atomic_write(path, buffer.getvalue())


class DamagedCacheError(Exception):
  """A cache file that cannot be read, or holds what no cache can; the message says
  what is wrong. `cached_scores` rebuilds such a file."""


def load_cache(path: str, fingerprint: str, data: DomainData, num_models: int) -> np.ndarray:
  """Reads the cache at `path` and checks it against `data` and the experts.

  Raises:
    InputError: the file was built for other data or other experts (its
      fingerprint differs): refused, never overwritten.
    DamagedCacheError: the file cannot be read (truncated, bytes flipped: the
      zip's CRC fails), or holds no cache of this data: not float32 [N, T, M],
      NaN or a log-probability > 0, a token no expert covers, or not 0 off the mask.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      cache, stored = f["cache"], str(f["fingerprint"])
  except Exception as e:  # zipfile and numpy raise a dozen kinds for a damaged file
    raise DamagedCacheError(f"unreadable: {type(e).__name__}: {e}") from e
  if stored != fingerprint:
    raise InputError(
      f"cache {path} was built for other data or other experts (fingerprint "
      f"{stored[:12]}…, expected {fingerprint[:12]}…, shape {cache.shape}); "
      f"delete it or use another workdir."
    )
  expected = (*data.inputs_NxT.shape, num_models)
  if cache.dtype != np.float32 or cache.shape != expected:
    raise DamagedCacheError(
      f"shape {cache.shape} {cache.dtype}, expected {expected} float32 (N, T, M)"
    )
  try:
    checks.check_token_logprobs(cache, data.mask_NxT, name="cache")
  except InputError as e:
    raise DamagedCacheError(str(e).rstrip(".")) from None
  if np.any(cache[~data.mask_NxT] != 0.0):
    raise DamagedCacheError("nonzero where the mask is off")
  return cache


def cached_scores(
  path: str, experts: Sequence[Expert], data: DomainData, log: Callable[[str], None] = print
) -> np.ndarray:
  """Loads the cache at `path` if it matches, else builds and saves it.

  A damaged file (`load_cache`'s DamagedCacheError) is announced in `log` and
  rebuilt: a cache is a pure function of the data and the experts, so a fresh
  one is the same cache. A file for other data or experts is refused.
  """
  fingerprint = cache_fingerprint(data, experts)
  num_models = sum(len(e.names) for e in experts)
  parallel.sync(f"cache {path}")  # every process takes the same branch
  if os.path.exists(path):
    try:
      return load_cache(path, fingerprint, data, num_models)
    except DamagedCacheError as e:
      log(f"cache {path} is damaged ({e}); rebuilding it.")
  cache = build_cache(experts, data)
  save_cache(path, cache, fingerprint)
  return cache


def cache_bytes(data: DomainData, experts: Sequence[Expert]) -> int:
  """N·T·M·4: the size of the float32 cache of `experts` on `data`."""
  return data.inputs_NxT.size * sum(len(e.names) for e in experts) * 4


def sharded_scores(
  directory: str,
  experts: Sequence[Expert],
  data: DomainData,
  *,
  shard_rows: int | None = None,
  log: Callable[[str], None] = print,
) -> shards.ShardedArray:
  """The cache of `cached_scores`, [N, T, M], in row shards under `directory`: scored,
  validated and written a shard at a time (`shard_rows` rows, by default about
  shards.SHARD_BYTES), read back through memory maps. Valid shards of an earlier run
  are kept; damaged ones are announced and scored again; a directory built for other
  data or experts is refused (InputError)."""
  if not experts:
    raise InputError("no experts given (M = 0).")
  check_vocabularies(experts, data)
  num_models = sum(len(e.names) for e in experts)
  N, T = data.inputs_NxT.shape

  def compute(lo: int, hi: int) -> np.ndarray:
    try:
      return build_cache(experts, data.subset(np.arange(lo, hi)))
    except InputError as e:  # its example numbers count from the shard's first row
      raise InputError(f"rows {lo}–{hi - 1} of {directory}: {e}") from None

  return shards.build(
    directory,
    fingerprint=cache_fingerprint(data, experts),
    shape=(N, T, num_models),
    dtype=np.float32,
    shard_rows=shard_rows or shards.rows_per_shard(T * num_models * 4),
    compute=compute,
    log=log,
    name=f"cache {directory}",
  )


def stored_scores(
  path: str,
  experts: Sequence[Expert],
  data: DomainData,
  *,
  budget_bytes: int | None,
  shard_rows: int | None = None,
  log: Callable[[str], None] = print,
) -> np.ndarray | shards.ShardedArray:
  """The rule: a cache of at most `budget_bytes` (None: any) is `cached_scores` at
  `path`.npz, in memory; a larger one `sharded_scores` in the directory `path`."""
  if budget_bytes is None or cache_bytes(data, experts) <= budget_bytes:
    return cached_scores(f"{path}.npz", experts, data, log=log)
  return sharded_scores(path, experts, data, shard_rows=shard_rows, log=log)
