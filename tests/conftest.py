"""Shared helpers for the tests, and the JAX settings every test runs under."""

import fcntl
import json
import os
import shutil

# Implicit rank promotion (adding a [K] array to a [N, K] one without saying so)
# is an error in every test: the library broadcasts explicitly. Exported before
# jax is imported, so the processes tests launch (launchers, notebook kernels)
# inherit it; set again below for the case where jax was imported first.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
# The launchers the end-to-end tests start share one persistent compilation cache
# (tests/devices.py, which also says why it has no size limit). The pytest workers
# themselves do not read that cache: twice a worker crashed inside
# compilation_cache.get_executable_and_time (a segfault, then an abort, the second time
# with jax's file lock on the cache), each time in an in-process job, never in a
# launcher. (With the cache's old 16 GiB limit, a worker on the cache was also slower, not
# faster: the in-process files of a run share few programs, and each write then cost what
# tests/devices.py says. Not measured without the limit.)

import jax
import numpy as np
import pytest

from robust_gate import finite

jax.config.update("jax_numpy_rank_promotion", "raise")


def random_instance(
  rng: np.random.Generator, K: int, N: int, M: int | None = None, perturbed: bool = False
):
  """A random finite game drawn from `rng` (see finite.random_instance)."""
  return finite.random_instance(int(rng.integers(2**31)), K, N, M, perturbed)


@pytest.fixture(scope="session")
def finished_tiny_job(tmp_path_factory, worker_id):
  """(workdir, stdout) of one finished tiny main job (launch/main.py in a process of its
  own, tests/test_pipeline.py's `run_main`) that every test reading one shares: the
  pytest-xdist workers too (the first to ask runs it, the others wait on a lock). Never
  changed by a test: a test that writes into a workdir copies it first."""
  from test_pipeline import run_main  # pylint: disable=g-import-not-at-top

  base = tmp_path_factory.getbasetemp()
  root = base if worker_id == "master" else base.parent  # the workers' common directory
  workdir, done = root / "finished_tiny_job", root / "finished_tiny_job.json"
  with open(root / "finished_tiny_job.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)
      out = run_main(workdir)
      done.write_text(json.dumps([out.returncode, out.stdout, out.stderr[-3000:]]))
    returncode, stdout, stderr = json.loads(done.read_text())
  assert returncode == 0, stderr
  return workdir, stdout


def pytest_configure(config):
  # pytest-xdist hands out the files with the most tests first unless told not to: the
  # order below is the one that keeps both workers busy to the end.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


# The end-to-end files take minutes each: handed out first, longest first, so that
# pytest-xdist runs them beside the many fast files instead of after them (the order within
# files stays). The two longest start at once, one on each worker of a 2-core run: the
# 2-process one (which asks for finished_tiny_job only at its end) beside test_pipeline.py
# (which runs that job); a worker with at most 2 tests left is handed the next file.
_SLOW_FIRST = (
  "test_pipeline_processes.py",
  "test_pipeline.py",
  "test_pipeline_devices.py",
  "test_experiments.py",
  "test_pipeline_resume.py",
  "test_reliability.py",
  "test_hf_sharding.py",
  "test_streaming.py",
  "test_hostile.py",
  "test_benchmark.py",
  "test_student_size.py",
  "test_student_seeds.py",
  "test_notebooks.py",
  "test_hf.py",
  "test_checkpoint_job.py",
  "test_parallel.py",
  "test_models.py",
  "test_distill.py",
  "test_sequence_level.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
