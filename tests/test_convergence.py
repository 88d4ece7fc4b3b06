"""The convergence experiment's certificate (robust_gate.experiments.convergence) as a
pure function of candidate gates' losses: its run on a main job is in test_experiments.py."""

import numpy as np
from tolerances import F32_RTOL

from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import convergence


def test_convergence_lower_value_gate_is_chosen_on_validation_and_scored_on_test():
  """The lower value's gate is the validation minimizer of λ̄·L, scored as it is on test,
  even where another candidate is lower on test (a minimum over test would pick it)."""
  lam_set = uncertainty_lib.simplex(2)
  reported = [{"validation": np.array([1.0, 1.0]), "test": np.array([1.2, 1.2])}]
  candidates = [
    reported[0],
    {"validation": np.array([0.5, 0.6]), "test": np.array([0.9, 0.9])},  # best on validation
    {"validation": np.array([0.8, 0.8]), "test": np.array([0.1, 0.1])},  # best on test
  ]
  out = convergence.certificates(reported, candidates, [np.array([0.5, 0.5])], lam_set)
  assert out["lower_candidate"] == [1]
  np.testing.assert_allclose(out["validation"]["lower"], [0.55], rtol=F32_RTOL)
  np.testing.assert_allclose(out["test"]["lower"], [0.9], rtol=F32_RTOL)
  np.testing.assert_allclose(out["test"]["upper"], [1.2], rtol=F32_RTOL)
  np.testing.assert_allclose(out["test"]["gap"], [0.3], rtol=F32_RTOL)
  # Worse than ĝ on test, the chosen gate leaves the lower value at ĝ's (gap ≥ 0, §7).
  candidates[1]["test"] = np.array([2.0, 2.0])
  out = convergence.certificates(reported, candidates, [np.array([0.5, 0.5])], lam_set)
  np.testing.assert_allclose(out["test"]["lower"], [1.2], rtol=F32_RTOL)
  assert out["test"]["gap"] == [0.0]
