"""The dual player: entropic mirror ascent on λ ∈ Λ (docs/math.md §4, step 3; §9).

An optax-style `init`/`update` pair over a NamedTuple state. optax's
`GradientTransformation` returns additive updates, which would leave λ a few
ulps off Λ and lose the log-space representation; so `update` returns the new
λ itself, and the state holds log λ, the authoritative value:

    log λ ← log Proj^KL_Λ( λ ⊙ exp(η_t · d_t) )
    λ     ← (1 − ε) λ + ε λ0          (optional smoothing toward the prior)

with the direction d_t = L̂_t (plain) or d_t = 2 L̂_t − L̂_{t−1} (optimistic, §9.2).
With `learning_rate=0` the player never moves: that is the ERM gate (λ fixed).
"""

from collections.abc import Callable
from typing import NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax

from robust_gate.uncertainty import UncertaintySet

ScalarOrSchedule: TypeAlias = float | optax.Schedule


class DualState(NamedTuple):
  log_lam_K: jax.Array  # log λ, a point of Λ.
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; the name is in checkpoints. number of updates so far (int32).


class OptimisticDualState(NamedTuple):
  """The optimistic player's state: a type of its own, so that the plain player's
  `DualState`, and with it every existing checkpoint's structure, is unchanged."""

  log_lam_K: jax.Array  # log λ, a point of Λ.
  count: jax.Array  # type: ignore[assignment]  # as in DualState.
  prev_losses_K: jax.Array  # L̂_{t−1}, the last losses seen (unused before the first update).


AnyDualState: TypeAlias = DualState | OptimisticDualState


class DualTransform(NamedTuple):
  """init(lam_K=None) -> state;  update(losses_K, state) -> (lam_K, state)."""

  init: Callable[..., AnyDualState]
  update: Callable[[jax.Array, AnyDualState], tuple[jax.Array, AnyDualState]]


def inverse_sqrt_schedule(learning_rate: float, timescale: float = 100.0) -> optax.Schedule:
  """η_t = η / √(1 + t/timescale): constant for the first ~timescale updates, then
  the η/√t decay under which averaged mirror descent converges (docs/math.md §9.1)."""
  if not learning_rate >= 0.0 or not timescale > 0.0:
    raise ValueError(
      f"inverse_sqrt_schedule needs learning_rate ≥ 0 and timescale > 0, got "
      f"{learning_rate} and {timescale}."
    )
  return lambda count: learning_rate / jnp.sqrt(1.0 + count / timescale)


def mirror_ascent(
  learning_rate: ScalarOrSchedule,
  uncertainty: UncertaintySet,
  smoothing: float = 0.0,
  *,
  optimistic: bool = False,
) -> DualTransform:
  """Entropic mirror ascent onto Λ.

  Args:
    learning_rate: η, a float or an optax schedule of the update count (e.g.
      `inverse_sqrt_schedule`).
    uncertainty: the set Λ; its `prior_K` is the default start and the
      smoothing target. `init(lam_K)` starts at the KL projection of `lam_K`
      onto Λ, so that λ is a point of Λ from step 0 whatever it is given.
    smoothing: ε ∈ [0, 1), the weight of the prior mixed in after each step.
    optimistic: step along 2 L̂_t − L̂_{t−1} instead of L̂_t (optimistic
      multiplicative weights, docs/math.md §9.2); the first update, which has
      no previous losses, is a plain one. The state is then an
      `OptimisticDualState`.

  Returns:
    A DualTransform.
  """
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"dual smoothing must be in [0, 1), got {smoothing}.")
  log_prior_K = jnp.log(uncertainty.prior_K)

  def init(lam_K=None) -> AnyDualState:
    start_K = uncertainty.prior_K if lam_K is None else jnp.asarray(lam_K)
    chex.assert_shape(start_K, (uncertainty.num_domains,))
    log_lam_K = uncertainty.project_log(jnp.log(start_K))
    count = jnp.zeros((), jnp.int32)
    if optimistic:
      return OptimisticDualState(log_lam_K, count, jnp.zeros_like(log_lam_K))
    return DualState(log_lam_K, count)

  def update(losses_K, state: AnyDualState):
    chex.assert_shape(losses_K, (uncertainty.num_domains,))
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    direction_K = losses_K
    if isinstance(state, OptimisticDualState):
      prev_K = jnp.where(state.count > 0, state.prev_losses_K, losses_K)
      direction_K = 2.0 * losses_K - prev_K
    log_lam_K = uncertainty.project_log(state.log_lam_K + eta * direction_K)
    if smoothing > 0.0:
      log_lam_K = jnp.logaddexp(jnp.log1p(-smoothing) + log_lam_K, jnp.log(smoothing) + log_prior_K)
    if isinstance(state, OptimisticDualState):
      return jnp.exp(log_lam_K), OptimisticDualState(log_lam_K, state.count + 1, losses_K)
    return jnp.exp(log_lam_K), DualState(log_lam_K, state.count + 1)

  return DualTransform(init, update)
