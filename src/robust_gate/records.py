"""What the main job's phases hand each other: frozen records, one per kind of result.

    Splits        the three data splits
    Experts       the K trained experts, stacked, and their digest
    Scored        one split with every expert's log-probs (the cache) and b_k
    Caches        the experts with their validation and test caches, and validation's
                  two parts: what the gates fit, what the dual players see
    Gate          a trained gate: config, GameState, loss function
    Gates         the robust gate, the ERM gate and the best response to λ̄
    Student       the distilled student
    Monolithic    one monolithic baseline model: config, parameters, loss function
    Monoliths     the three monolithic baselines
    TrainedModels everything a finished workdir holds (`pipeline.load_models`)

Records hold arrays and configs, never the ml_collections config: code below the
pipeline takes them as typed arguments.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from robust_gate import experts, models, primal_dual
from robust_gate.data import DomainData
from robust_gate.shards import ShardedArray

# A per-domain loss function of a primal-dual game: (params, batch, key) -> losses [K].
LossFn = Callable[[Any, Any, Any], Any]


def _named(record) -> Iterator[tuple[str, Any]]:
  return ((f.name, getattr(record, f.name)) for f in dataclasses.fields(record))


@dataclasses.dataclass(frozen=True)
class Splits:
  train: DomainData
  validation: DomainData
  test: DomainData


@dataclasses.dataclass(frozen=True)
class Experts:
  lm_cfg: models.LMConfig  # one expert's architecture
  params: Any  # the K experts' parameters, stacked on a leading axis
  group: experts.Expert  # the K experts as one scorer of token log-probs

  @property
  def digest(self) -> str:
    """Fingerprint of the parameters (in the specs of the phases that read them)."""
    return self.group.fingerprint

  def one(self, j: int) -> Any:
    """Expert j's parameters (unstacked)."""
    return jax.tree_util.tree_map(lambda x: x[j], self.params)


@dataclasses.dataclass(frozen=True)
class Scored:
  """One data split scored by every expert."""

  data: DomainData
  cache_NxTxM: np.ndarray | ShardedArray  # log p_j(x_t | x_<t) of every expert j at every token
  baseline_K: np.ndarray  # b_k, nats per token (docs/math.md §3)

  def only_experts(self, keep) -> "Scored":
    """The same split scored by the experts `keep` only (indices into M)."""
    return dataclasses.replace(self, cache_NxTxM=self.cache_NxTxM[..., keep])

  def subset(self, idx) -> "Scored":
    """The examples `idx` only (the same b_k)."""
    return dataclasses.replace(self, data=self.data.subset(idx), cache_NxTxM=self.cache_NxTxM[idx])


@dataclasses.dataclass(frozen=True)
class Caches:
  """The experts' caches. Validation is split, per domain and from config.seed, into
  `fit`, what every gate is fitted to, and `holdout` (config.gate.dual_holdout of
  each domain's sequences), what the dual players of the robust gate and the group
  DRO model see, so that λ moves on held-out losses (docs/math.md §4). Each part has
  its own b_k. Only the evaluation phase reads `test`."""

  experts: Experts
  validation: Scored  # the whole split (b_k on all of it)
  fit: Scored  # validation less `holdout`: what the gates are trained on
  holdout: Scored | None  # what the duals see; None (dual_holdout 0): their own losses
  test: Scored  # what every method is evaluated on


@dataclasses.dataclass(frozen=True)
class Gate:
  cfg: models.GateConfig
  state: primal_dual.GameState  # the whole game: w, λ, λ̄, EMA of w, optimizer, key
  loss_fn: LossFn  # per-domain losses on minibatches of what it was fitted to (Caches.fit)

  @property
  def params(self) -> Any:
    """The gate reported, evaluated and distilled: the EMA of w (docs/math.md §4)."""
    return self.state.ema_params


@dataclasses.dataclass(frozen=True)
class Gates:
  robust_gate: Gate  # trained against the worst case over Λ
  erm_gate: Gate  # λ fixed at the uniform mixture
  best_response: Gate  # λ fixed at the robust gate's λ̄, from its EMA (docs/math.md §7.1)

  def items(self) -> Iterator[tuple[str, Gate]]:
    """(name, gate): the names are their directories in the workdir."""
    return _named(self)


@dataclasses.dataclass(frozen=True)
class Student:
  lm_cfg: models.LMConfig  # an expert's architecture
  params: Any
  init_from: int  # the expert it started from (the domain with the largest λ̄)


@dataclasses.dataclass(frozen=True)
class Monolithic:
  lm_cfg: models.LMConfig
  params: Any
  loss_fn: LossFn  # per-domain losses on train minibatches


@dataclasses.dataclass(frozen=True)
class Monoliths:
  monolithic: Monolithic  # an expert's size, the uniform mixture (ERM)
  monolithic_dro: Monolithic  # an expert's size, group DRO over Λ
  monolithic_large: Monolithic  # about all experts' size, ERM

  def items(self) -> Iterator[tuple[str, Monolithic]]:
    """(name, model): the names are their directories in the workdir."""
    return _named(self)


@dataclasses.dataclass(frozen=True)
class TrainedModels:
  """Everything the phases trained in a workdir, restored (`pipeline.load_models`)."""

  splits: Splits
  caches: Caches  # the experts, and the caches and b_k of validation and test
  gates: Gates
  student: Student
  monoliths: Monoliths

  @property
  def experts(self) -> Experts:
    return self.caches.experts
