"""The experts' caches: every expert's scores of validation and test, the baselines b_k,
and validation's two parts (docs/math.md §1, §3, §4).

The `train_gate` phase scores both splits once (`score`; `<workdir>/cache_*.npz`,
fingerprinted with the data and the experts' parameters), so that the gates train on
cached log-probs and evaluation need not rerun the experts. Validation is split, per
domain and from config.seed, into the part every gate is fitted to and the holdout
the dual players see (`dual_holdout`); each part has its own b_k (`baseline`).

Like robust_gate.phases, these functions read the config and return typed records
(robust_gate.records).
"""

import dataclasses
import os

import numpy as np

from robust_gate import datasets, evaluate, experts, objectives
from robust_gate.checks import InputError
from robust_gate.data import DomainData
from robust_gate.records import Caches, Experts, Scored, Splits


def score(config, workdir: str, splits: Splits, trained: Experts, log=print) -> Caches:
  """Every expert's log-probs on validation and test (cached in the workdir; a damaged
  cache is announced through `log` and rebuilt), b_k, and validation's two parts
  (`dual_holdout`), each with its own b_k."""
  scored = {}
  for split in ("validation", "test"):
    d = getattr(splits, split)
    # In memory as cache_<split>.npz while it fits the device budget, else in shards.
    stem = os.path.join(workdir, f"cache_{split}")
    budget = config.get("device_budget_bytes")
    cache = experts.stored_scores(stem, [trained.group], d, budget_bytes=budget, log=log)
    scored[split] = Scored(d, cache, baseline(config, cache, d))
  va = scored["validation"]
  held_N = dual_holdout(config, va.data)
  part = lambda keep_N: _rescored(config, va, np.flatnonzero(keep_N))
  return Caches(
    experts=trained, fit=part(~held_N), holdout=part(held_N) if held_N.any() else None, **scored
  )


def _rescored(config, scored: Scored, idx) -> Scored:
  """The examples `idx` of a scored split, with b_k measured on them."""
  part = scored.subset(idx)
  return dataclasses.replace(part, baseline_K=baseline(config, part.cache_NxTxM, part.data))


def dual_holdout(config, d: DomainData) -> np.ndarray:
  """Which validation sequences the dual players see and no gate is fitted to, [N] bool:
  `config.gate.dual_holdout` of each domain's, drawn from config.seed (docs/math.md §4).

  The same for every gate, so that they are fitted to the same data and comparable.
  A fraction that leaves a domain with no sequence on one side is an InputError.
  """
  fraction, rng = config.gate.dual_holdout, np.random.default_rng(config.seed)
  held_N = np.zeros(len(d.domain_N), bool)
  if fraction == 0:
    return held_N
  for k, name in enumerate(d.domains):
    idx = np.flatnonzero(d.domain_N == k)
    n = round(fraction * len(idx))
    if not 0 < n < len(idx):
      raise InputError(
        f"config.gate.dual_holdout={fraction} holds out {n} of domain {name}'s {len(idx)} "
        f"validation sequences: each side needs at least one; choose a fraction in "
        f"(0, 1) nearer 0.5, or 0 for the in-sample dual."
      )
    held_N[rng.permutation(idx)[:n]] = True
  return held_N


def check_baseline(config) -> None:
  """config.baseline names a baseline b_k this data has."""
  if config.baseline not in objectives.BASELINES:
    raise InputError(
      f"unknown config.baseline {config.baseline!r}; choose expert, entropy or none."
    )
  if config.baseline == "entropy" and config.data.name != "markov":
    raise InputError(
      f"baseline 'entropy' needs known entropies: only the markov "
      f"dataset has them, not {config.data.name!r}."
    )


def baseline(config, cache_NxTxM, d: DomainData) -> np.ndarray:
  """b_k in nats per token (docs/math.md §3) on split `d`."""
  check_baseline(config)
  K = d.num_domains
  if config.baseline == "expert":
    return np.array([evaluate.domain_ce(cache_NxTxM[..., k], d)[k] for k in range(K)])
  if config.baseline == "none":
    return np.zeros(K)
  return datasets.markov_entropy(datasets.make_config("markov", **dict(config.data.options)))
