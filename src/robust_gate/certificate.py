"""The duality-gap certificate of a reported gate (docs/math.md §7).

Weak duality: for every λ' ∈ Λ and every gate ĝ of the family,

    ℓ(λ') = min_w Σ_k λ'_k L_k(w)  ≤  min_w max_{λ∈Λ} F(w, λ)  ≤  max_{λ∈Λ} Σ_k λ_k L_k(ĝ) = U(ĝ),

so the gap U(ĝ) − ℓ(λ̄) bounds how far ĝ's worst case is from the best worst case
its family can reach. ℓ(λ̄) needs a best response to λ̄: a gate of the same family
fitted with λ fixed at λ̄.

* `duality_gap` combines held-out losses of ĝ and of a best response; for network
  gates the best response is trained (nonconvex, approximate) and scored on held-out
  data, so the lower value is an estimate (`lower_is_estimate=True`).
* `finite_best_response` and `finite_duality_gap` compute the lower value exactly on
  a finite space, for the tabular family of docs/math.md §2.2, in float64.
"""

from typing import TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from robust_gate import checks
from robust_gate.uncertainty import UncertaintySet

# Bisection steps for the best response's scale τ, on log τ; float64 settles in < 80.
_BISECTION_STEPS = 200
# jax arrays from `duality_gap`, float64 numpy from `finite_duality_gap`.
Value: TypeAlias = jax.Array | np.ndarray


@struct.dataclass
class Certificate:
  """Upper and lower values of the game at (ĝ, λ̄) and their gap (docs/math.md §7)."""

  upper: Value  # U(ĝ) = max_{λ∈Λ} Σ_k λ_k L_k(ĝ).
  lower: Value  # ℓ(λ̄) = min_w Σ_k λ̄_k L_k(w), or its estimate.
  gap: Value  # U − ℓ ≥ 0.
  lam_bar_K: Value  # the λ̄ the lower value is taken at.
  lam_worst_K: Value  # a maximizer of U.
  # True when ℓ comes from a trained best response scored on held-out data.
  lower_is_estimate: bool = struct.field(pytree_node=False, default=True)


def duality_gap(
  losses_K: jax.Array,
  best_response_losses_K: jax.Array,
  lam_bar_K: jax.Array,
  uncertainty: UncertaintySet,
  *,
  lower_is_estimate: bool = True,
) -> Certificate:
  """The certificate of ĝ from its losses and those of a best response to λ̄.

  The lower value is the smaller of λ̄·L(best response) and λ̄·L(ĝ): ĝ belongs to
  the family too, so min_w Σ_k λ̄_k L_k(w) is at most either, and the gap is
  never negative (λ̄ ∈ Λ, so U(ĝ) ≥ λ̄·L(ĝ)). Pure and jit-compatible.

  Args:
    losses_K: L_k(ĝ) of the reported gate, on held-out data.
    best_response_losses_K: L_k of the gate fitted at λ fixed to λ̄, on the same data.
    lam_bar_K: λ̄, a point of Λ (the average λ of the game).
    uncertainty: Λ.
    lower_is_estimate: False only when the best response is exact (finite spaces).

  Returns:
    A Certificate.
  """
  chex.assert_shape([losses_K, best_response_losses_K, lam_bar_K], (uncertainty.num_domains,))
  upper, lam_worst_K = uncertainty.max_linear(losses_K)
  lower = jnp.minimum(jnp.dot(lam_bar_K, best_response_losses_K), jnp.dot(lam_bar_K, losses_K))
  return Certificate(
    upper=upper,
    lower=lower,
    gap=upper - lower,
    lam_bar_K=lam_bar_K,
    lam_worst_K=lam_worst_K,
    lower_is_estimate=lower_is_estimate,
  )


def finite_best_response(domain_probs_KxN, expert_logprobs_MxN, lam_K) -> np.ndarray:
  """The exact best response to λ over the tabular family on a finite space, [N].

  The family's closure is {p ∈ Δ_N : ∃ τ ≥ 0, τ·lo ≤ p ≤ τ·hi} with lo, hi the
  pointwise min and max of the experts (docs/math.md §2.2), and the best response
  minimizes CE(D_λ, p), D_λ = Σ_k λ_k D_k, over it. Its KKT conditions give
  p = clip(D_λ, τ·lo, τ·hi) with the one τ at which that sums to 1
  (docs/math.md §7.2); Σ_x clip(D_λ(x), τ lo(x), τ hi(x)) increases with τ, so τ
  is found by bisection, in float64.
  """
  probs = checks.check_probabilities(domain_probs_KxN)
  logp = checks.check_logprobs(expert_logprobs_MxN)
  checks.check_support(probs, logp)
  lam = _check_mixture(lam_K, probs.shape[0], "lam_K")
  q_N = lam @ probs
  expert_probs_MxN = np.exp(logp)
  lo_N, hi_N = expert_probs_MxN.min(axis=0), expert_probs_MxN.max(axis=0)
  mass = lambda log_tau: np.sum(np.clip(q_N, np.exp(log_tau) * lo_N, np.exp(log_tau) * hi_N))
  # At τ = 1/Σ hi the sum is ≤ 1; at τ = max_{q>0} q/hi it is ≥ Σ q = 1.
  a = -np.log(hi_N.sum())
  b = np.log(np.max(q_N[q_N > 0] / hi_N[q_N > 0]))
  for _ in range(_BISECTION_STEPS):
    mid = 0.5 * (a + b)
    a, b = (a, mid) if mass(mid) >= 1.0 else (mid, b)
  p_N = np.clip(q_N, np.exp(b) * lo_N, np.exp(b) * hi_N)
  return p_N / p_N.sum()


def finite_duality_gap(
  domain_probs_KxN,
  expert_logprobs_MxN,
  baseline_K,
  losses_K,
  lam_bar_K,
  uncertainty: UncertaintySet,
) -> Certificate:
  """The exact certificate of a finite-space gate, in float64 (docs/math.md §7.2).

  Args:
    domain_probs_KxN: D_k(x).
    expert_logprobs_MxN: log p_j(x).
    baseline_K: the b_k the losses use (e.g. H(D_k) for `finite.solve`'s default).
    losses_K: L_k(ĝ) of the reported gate (`FiniteSolution.domain_loss`).
    lam_bar_K: λ̄ (`FiniteSolution.lam_avg`), renormalized here.
    uncertainty: Λ.

  Returns:
    A Certificate of float64 numpy values with `lower_is_estimate=False`: the
    lower value is min over the tabular family, exact up to float64 rounding.
    (For a smaller family such as `finite.solve`'s "mlp" gate it is still a
    valid lower value, of the larger family.)
  """
  probs = checks.check_probabilities(domain_probs_KxN)
  K = probs.shape[0]
  if uncertainty.num_domains != K:
    raise checks.InputError(
      f"uncertainty set is over {uncertainty.num_domains} domains but domain_probs has K={K}."
    )
  b_K = _check_vector(baseline_K, K, "baseline_K")
  loss_K = _check_vector(losses_K, K, "losses_K")
  lam_K = check_in_set(lam_bar_K, uncertainty, "lam_bar_K")
  p_N = finite_best_response(probs, expert_logprobs_MxN, lam_K)
  pos = probs > 0
  log_p_KxN = np.log(np.where(pos, np.broadcast_to(p_N, probs.shape), 1.0))
  best_loss_K = -np.sum(np.where(pos, probs * log_p_KxN, 0.0), axis=1) - b_K
  # Λ's maximizer in float32, the value in float64 (as `finite.solve` reports U).
  _, lam_worst = uncertainty.max_linear(jnp.asarray(loss_K, jnp.float32))
  lam_worst_K = np.asarray(lam_worst, np.float64)
  upper = float(lam_worst_K @ loss_K)
  lower = min(float(lam_K @ best_loss_K), float(lam_K @ loss_K))
  return Certificate(
    upper=np.asarray(upper),
    lower=np.asarray(lower),
    gap=np.asarray(upper - lower),
    lam_bar_K=lam_K,
    lam_worst_K=lam_worst_K,
    lower_is_estimate=False,
  )


def check_in_set(lam_K, uncertainty: UncertaintySet, name: str) -> np.ndarray:
  """`lam_K` as a float64 point of Λ, renormalized; raises InputError when it is not
  one (up to 1e-4): weak duality holds for the λ of Λ only."""
  lam = _check_mixture(lam_K, uncertainty.num_domains, name)
  if not uncertainty.contains(lam, atol=1e-4):
    raise checks.InputError(f"{name}={lam.tolist()} is not a point of the {uncertainty.kind} Λ.")
  return lam


def _check_vector(x, size: int, name: str) -> np.ndarray:
  arr = checks.as_float_array(x, name, 1)
  if arr.shape != (size,):
    raise checks.InputError(f"{name} must have shape ({size},), got {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise checks.InputError(f"{name} contains NaN or infinite values: {arr.tolist()}.")
  return arr


def _check_mixture(x, size: int, name: str) -> np.ndarray:
  """A point of Δ_K (up to checks.SUM_ATOL), renormalized."""
  lam = _check_vector(x, size, name)
  if np.any(lam < 0) or abs(lam.sum() - 1.0) > checks.SUM_ATOL:
    raise checks.InputError(
      f"{name} must be a point of the simplex, got {lam.tolist()} (sum {lam.sum():.6g})."
    )
  return lam / lam.sum()
