import jax.numpy as jnp
import numpy as np
from conftest import random_instance

from robust_gate import objectives, reference, uncertainty


def test_exact_solver_matches_brute_force_on_three_points():
  """Grid search over the reachable models p ∝ c, min_j p_j ≤ c ≤ max_j p_j."""
  rng = np.random.default_rng(0)
  for _trial in range(3):
    D, logE = random_instance(rng, 2, 3, perturbed=True)
    E = np.exp(logE)
    lo, hi = E.min(0), E.max(0)
    H = np.asarray(objectives.entropy(jnp.asarray(D)), np.float64)
    g = np.linspace(1e-4, 1 - 1e-4, 600)
    p1, p2 = np.meshgrid(g, g, indexing="ij")
    P = np.stack([p1, p2, 1 - p1 - p2], -1).reshape(-1, 3)
    P = P[P[:, 2] > 1e-4]
    reachable = (P / hi).max(1) <= (P / lo).min(1)  # ∃ t: t·lo ≤ p ≤ t·hi
    P = P[reachable]
    with np.errstate(divide="ignore", invalid="ignore"):
      L = -(np.where(D > 0, D, 0)[None] * np.log(P)[:, None, :]).sum(-1) - H
    brute = L.max(1).min()
    exact = reference.solve_exact(D, logE, H, uncertainty.simplex(2))
    assert exact.value <= brute + 1e-6
    assert brute - exact.value < 2e-3
    assert np.all(exact.model_probs / hi <= (exact.model_probs / lo).min() * (1 + 1e-4))
