"""Shared helpers for the tests."""

import numpy as np

from robust_gate import finite


def random_instance(rng: np.random.Generator, K: int, N: int, M: int | None = None,
                    perturbed: bool = False):
  """A random finite game drawn from `rng` (see finite.random_instance)."""
  return finite.random_instance(int(rng.integers(2**31)), K, N, M, perturbed)
