"""Shared helpers for the tests, and the JAX settings every test runs under."""

import os

# Implicit rank promotion (adding a [K] array to a [N, K] one without saying so)
# is an error in every test: the library broadcasts explicitly. Exported before
# jax is imported, so the processes tests launch (launchers, notebook kernels)
# inherit it; set again below for the case where jax was imported first.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
# The launchers the end-to-end tests start share one persistent compilation cache
# (tests/test_pipeline.py's ENV). Without a size limit jax writes an entry in place and
# reads it without a lock; a limit turns on jax's file lock around every read and write.
# The pytest workers themselves do not read that cache: twice a worker crashed inside
# compilation_cache.get_executable_and_time (a segfault, then an abort, the second time
# with the lock on), each time in an in-process job, never in a launcher.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

import jax
import numpy as np

from robust_gate import finite

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update(
  "jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"])
)


def random_instance(
  rng: np.random.Generator, K: int, N: int, M: int | None = None, perturbed: bool = False
):
  """A random finite game drawn from `rng` (see finite.random_instance)."""
  return finite.random_instance(int(rng.integers(2**31)), K, N, M, perturbed)


# The end-to-end files take minutes each: handed out first, pytest-xdist runs them
# beside the many fast files instead of after them (the order within files stays).
_SLOW_FIRST = (
  "test_pipeline.py",
  "test_experiments.py",
  "test_notebooks.py",
  "test_hostile.py",
  "test_benchmark.py",
  "test_golden.py",
  "test_parallel.py",
  "test_streaming.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
