"""Shared fixtures: random finite instances where every quantity is exact."""

import numpy as np


def random_instance(rng: np.random.Generator, K: int, N: int, M: int | None = None,
                    perturbed: bool = False):
  """Returns (domain_probs_KxN, expert_logprobs_MxN).

  Domains are sparse-ish Dirichlet draws (some points have zero mass). Exact
  experts are the domains themselves (M = K); perturbed experts mix each
  domain with 30% of a random full-support distribution.
  """
  D = rng.dirichlet(np.full(N, 0.3), size=K)
  D = np.where(D > 1e-3, D, 0.0)
  D /= D.sum(axis=1, keepdims=True)
  M = K if M is None else M
  E = D[np.arange(M) % K]
  if perturbed:
    E = 0.7 * E + 0.3 * rng.dirichlet(np.ones(N), size=M)
  with np.errstate(divide="ignore"):
    return D, np.log(E)
