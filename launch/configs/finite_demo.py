"""Finite-space demo: the robust gating game next to its exact solution."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seed of the random instance and of the game
  c.num_domains = 3  # K, number of domains D_k
  c.num_points = 32  # N, size of the finite space
  c.perturbed = True  # experts = 70% own domain + 30% noise (else exact)
  c.uncertainty = "simplex"  # Λ: "simplex", "box" or "kl_ball"
  c.box_lo = 0.1  # box: every λ_k ≥ box_lo
  c.box_hi = 0.6  # box: every λ_k ≤ box_hi
  c.kl_radius = 0.1  # kl_ball: KL(λ ‖ uniform) ≤ kl_radius
  c.gate = "tabular"  # "tabular" or "mlp" sequence-level gate
  c.baseline = "entropy"  # b_k of docs/math.md §3: "entropy", "expert" or "none"
  c.steps = 3000  # primal-dual steps (one lax.scan)
  c.primal_lr = 0.1  # Adam step size of the gate (0.01 for gate="mlp")
  c.dual_lr = 0.1  # mirror-ascent step size η (decays as 1/√(1+t/100))
  c.batch_size = 0  # samples per domain per step; 0 = exact expectations
  return c
