"""The dual player: entropic mirror ascent on λ ∈ Λ (docs/math.md §4, step 3).

An optax-style `init`/`update` pair over a NamedTuple state. optax's
`GradientTransformation` returns additive updates, which would leave λ a few
ulps off Λ and lose the log-space representation; so `update` returns the new
λ itself, and the state holds log λ, the authoritative value:

    log λ ← log Proj^KL_Λ( λ ⊙ exp(η_t · L̂) )
    λ     ← (1 − ε) λ + ε λ0          (optional smoothing toward the prior)

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


class DualTransform(NamedTuple):
  """init(lam_K=None) -> state;  update(losses_K, state) -> (lam_K, state)."""

  init: Callable[..., DualState]
  update: Callable[[jax.Array, DualState], tuple[jax.Array, DualState]]


def mirror_ascent(
  learning_rate: ScalarOrSchedule, uncertainty: UncertaintySet, smoothing: float = 0.0
) -> DualTransform:
  """Entropic mirror ascent onto Λ.

  Args:
    learning_rate: η, a float or an optax schedule of the update count.
    uncertainty: the set Λ; its `prior_K` is the default start and the
      smoothing target.
    smoothing: ε ∈ [0, 1), the weight of the prior mixed in after each step.

  Returns:
    A DualTransform.
  """
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"dual smoothing must be in [0, 1), got {smoothing}.")
  log_prior_K = jnp.log(uncertainty.prior_K)

  def init(lam_K=None) -> DualState:
    start_K = uncertainty.prior_K if lam_K is None else jnp.asarray(lam_K)
    chex.assert_shape(start_K, (uncertainty.num_domains,))
    return DualState(
      log_lam_K=uncertainty.project_log(jnp.log(start_K)), count=jnp.zeros((), jnp.int32)
    )

  def update(losses_K, state: DualState):
    chex.assert_shape(losses_K, (uncertainty.num_domains,))
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
    log_lam_K = uncertainty.project_log(state.log_lam_K + eta * losses_K)
    if smoothing > 0.0:
      log_lam_K = jnp.logaddexp(jnp.log1p(-smoothing) + log_lam_K, jnp.log(smoothing) + log_prior_K)
    return jnp.exp(log_lam_K), DualState(log_lam_K, state.count + 1)

  return DualTransform(init, update)
