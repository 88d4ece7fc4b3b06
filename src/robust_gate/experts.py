"""Experts as pure functions, and the cache of their log-probabilities (MATH.md §1, §2.1).

An `Expert` is any jittable pure function of (inputs_BxT, targets_BxT) returning
log p(target_t | x_≤t): shape [B, T] for one model, or [B, T, m] for a group of
m models computed as one program (the stacked transformers). Experts of any
kind plug in this way; all must share the data's vocabulary.

`build_cache` scores every expert once over a dataset, `[N, T, M]`, validates
it, and `save_cache` / `load_cache` tie the file to a fingerprint of the data
and the experts so a cache cannot be used with other data.
"""

import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import checks, models, parallel
from robust_gate.checks import InputError
from robust_gate.data import DomainData


@dataclasses.dataclass(frozen=True)
class Expert:
  names: tuple            # one name per model in this expert (group)
  vocab_size: int
  logprob_fn: Callable    # (inputs_BxT, targets_BxT) -> [B, T] or [B, T, m]
  fingerprint: str = ""   # identifies the parameters (for cache checks)


def transformer_experts(config: models.LMConfig, params_M, names: Sequence[str]) -> Expert:
  """Stacked TransformerLM experts as one Expert group."""
  return Expert(
      names=tuple(names), vocab_size=config.vocab_size,
      logprob_fn=lambda x, y: models.stacked_token_logprobs(config, params_M, x, y),
      fingerprint=params_fingerprint(params_M))


def params_fingerprint(params) -> str:
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def check_vocabularies(experts: Sequence[Expert], data: DomainData) -> None:
  vocabs = [(e.names, e.vocab_size) for e in experts]
  if len({v for _, v in vocabs}) > 1:
    raise InputError(f"experts' vocabularies differ: {vocabs}; a gate mixes "
                     f"next-token distributions over one vocabulary.")
  vocab = vocabs[0][1]
  if vocab != data.vocab_size:
    raise InputError(f"experts have vocabulary size {vocab} but the data has "
                     f"{data.vocab_size}.")


def build_cache(experts: Sequence[Expert], data: DomainData,
                batch_size: int = 512) -> np.ndarray:
  """log p_j(target_t | x_≤t) of every expert on every example, [N, T, M]."""
  if not experts:
    raise InputError("no experts given (M = 0).")
  check_vocabularies(experts, data)
  fns = [jax.jit(e.logprob_fn) for e in experts]
  N = len(data.inputs_NxT)
  batch_size += -batch_size % jax.device_count()  # split evenly over the devices
  pad = -N % batch_size  # one compiled shape: pad the last batch
  inputs = np.pad(data.inputs_NxT, ((0, pad), (0, 0)))
  targets = np.pad(data.targets_NxT, ((0, pad), (0, 0)))
  chunks = []
  for i in range(0, N + pad, batch_size):
    (x, y), _ = parallel.put_rows(inputs[i:i + batch_size], targets[i:i + batch_size])
    outs = [np.asarray(f(x, y), np.float32) for f in fns]
    chunks.append(np.concatenate([o[..., None] if o.ndim == 2 else o for o in outs],
                                 axis=-1))
  cache = np.concatenate(chunks)[:N]
  names = sum((e.names for e in experts), ())
  if cache.shape[-1] != len(names):
    raise InputError(f"experts returned {cache.shape[-1]} log-prob columns for "
                     f"{len(names)} names {names}.")
  cache = np.where(data.mask_NxT[..., None], cache, 0.0).astype(np.float32)
  checks.check_token_logprobs(cache, data.mask_NxT, name="expert cache")
  return cache


def cache_fingerprint(data: DomainData, experts: Sequence[Expert]) -> str:
  return hashlib.sha1((data.fingerprint() + "|".join(
      e.fingerprint + repr(e.names) for e in experts)).encode()).hexdigest()


def save_cache(path: str, cache: np.ndarray, fingerprint: str) -> None:
  """Writes atomically: a crash leaves the old file or none, never half of one."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, cache=cache, fingerprint=np.array(fingerprint))
  os.replace(tmp, path)


def load_cache(path: str, fingerprint: str, data: DomainData) -> np.ndarray:
  with np.load(path) as f:
    cache, stored = f["cache"], str(f["fingerprint"])
  if stored != fingerprint or cache.shape[:2] != data.inputs_NxT.shape:
    raise InputError(
        f"cache {path} was built for other data or other experts (fingerprint "
        f"{stored[:12]}…, expected {fingerprint[:12]}…, shape {cache.shape}); "
        f"delete it or use another workdir.")
  return cache


def cached_scores(path: str, experts: Sequence[Expert], data: DomainData) -> np.ndarray:
  """Loads the cache at `path` if it matches, else builds and saves it."""
  fingerprint = cache_fingerprint(data, experts)
  if os.path.exists(path):
    return load_cache(path, fingerprint, data)
  cache = build_cache(experts, data)
  save_cache(path, cache, fingerprint)
  return cache
