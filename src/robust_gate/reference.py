"""An independent exact solver of the finite-space game, by convex optimization.

It shares no code with the primal-dual algorithm (only input checks) and is what
the tests compare `robust_gate.finite.solve` against.

The tabular sequence-level gate (docs/math.md §2.2) reaches exactly the models
p(x) = c(x) / Σ_x' c(x') with c(x) = Σ_j π_j(x) p_j(x), π(x) ∈ Δ_M, i.e.
min_j p_j(x) ≤ c(x) ≤ max_j p_j(x). Writing t = 1/Σc, the closure of that
family is the polyhedron {p ∈ Δ_N : ∃ t ≥ 0, t·min_j p_j ≤ p ≤ t·max_j p_j},
over which L_k(p) = CE(D_k, p) − b_k is convex; the max over Λ of Σ λ_k L_k is
rewritten through LP duality (box) or the Donsker-Varadhan dual (KL ball) so
the whole minimax is one convex program (exponential cone), solved by Clarabel.
"""

from typing import NamedTuple

import cvxpy as cp
import numpy as np

from robust_gate import checks
from robust_gate.uncertainty import UncertaintySet


class ExactSolution(NamedTuple):
  value: float  # min_p max_{λ∈Λ} Σ_k λ_k L_k(p).
  model_probs: np.ndarray  # [N] a minimizing p.
  domain_loss: np.ndarray  # [K] L_k at that p.


def solve_exact(
  domain_probs_KxN, expert_logprobs_MxN, baseline_K, uncertainty: UncertaintySet
) -> ExactSolution:
  """The exact minimax value of the finite game with a tabular gate.

  Args:
    domain_probs_KxN: D_k(x).
    expert_logprobs_MxN: log p_j(x).
    baseline_K: b_k (e.g. the entropies H(D_k) for exact KL losses).
    uncertainty: Λ.

  Returns:
    ExactSolution.
  """
  probs = checks.check_probabilities(domain_probs_KxN)
  logp = checks.check_logprobs(expert_logprobs_MxN)
  checks.check_support(probs, logp)
  K, N = probs.shape
  b = np.asarray(baseline_K, np.float64)
  expert_probs = np.exp(logp)
  lo_N, hi_N = expert_probs.min(axis=0), expert_probs.max(axis=0)

  p = cp.Variable(N, nonneg=True)
  t = cp.Variable(nonneg=True)
  cons = [cp.sum(p) == 1, p >= t * lo_N, p <= t * hi_N]
  losses = []
  for k in range(K):
    s = probs[k] > 0
    losses.append(cp.sum(cp.multiply(probs[k, s], -cp.log(p[s]))) - b[k])
  L = cp.hstack(losses)

  if uncertainty.kind == "simplex":
    value = cp.Variable()
    cons.append(value >= L)
    objective = value
  elif uncertainty.kind == "box":
    lo, hi = np.asarray(uncertainty.lo_K, np.float64), np.asarray(uncertainty.hi_K, np.float64)
    nu = cp.Variable()
    objective = lo @ L + nu * (1 - lo.sum()) + (hi - lo) @ cp.pos(L - nu)
  else:
    # max_{KL(λ‖λ0) ≤ r} <λ, L> = min_{τ>0} τ r + τ log Σ_k λ0_k exp(L_k / τ).
    prior = np.asarray(uncertainty.prior_K, np.float64)
    r = float(uncertainty.radius)
    support = np.flatnonzero(prior > 0)
    tau, shift = cp.Variable(nonneg=True), cp.Variable()
    ell, u = cp.Variable(len(support)), cp.Variable(len(support))
    for i, s in enumerate(support):
      cons += [ell[i] >= L[s], cp.constraints.ExpCone(ell[i] - shift, tau, u[i])]
    cons.append(prior[support] @ u <= tau)
    objective = tau * r + shift
  problem = cp.Problem(cp.Minimize(objective), cons)
  problem.solve(solver=cp.CLARABEL)
  if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
    raise RuntimeError(f"exact solver failed: status {problem.status}.")
  model_probs = np.clip(np.asarray(p.value, np.float64), 0, None)
  model_probs /= model_probs.sum()
  domain_loss = (
    np.array(
      [-np.sum(probs[k][probs[k] > 0] * np.log(model_probs[probs[k] > 0])) for k in range(K)]
    )
    - b
  )
  return ExactSolution(float(problem.value), model_probs, domain_loss)
