"""The student against the same-size models over seeds (experiments/student_seeds.py),
on a copy of the finished tiny main job (conftest.py). The tests' bodies train: they run
in one process of their own on the launchers' compilation cache (children.py), which
holds the tiny job's programs."""

import copy
import json
import os
import pathlib
import shutil

import children
import jax
import numpy as np
import pytest
from test_pipeline import ENV
from tolerances import F32_RTOL

from robust_gate import config_files, pipeline
from robust_gate.experiments import student_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda s: None


def _tiny(job: str, tmp: str):
  """(config, workdir): the tiny config at 2 seeds, a copy of the finished job `job`."""
  config = config_files.load(os.path.join(ROOT, "launch", "configs", "tiny.py"))
  workdir = str(shutil.copytree(job, pathlib.Path(tmp) / "tiny"))
  config = copy.deepcopy(config)
  config.experiment_seeds = 2
  return config, workdir


_BODIES = (
  "_a_seed_is_trained_as_the_main_job_trains_it",
  "_student_seeds_reports_every_seed_beside_the_main_jobs",
)


@pytest.fixture(scope="module")
def ran(finished_tiny_job, tmp_path_factory, request):
  """children.run's record of the selected bodies of _BODIES, in one child, each on a
  copy of the finished tiny job of its own."""
  return children.run_on_job(request, _BODIES, str(finished_tiny_job[0]), tmp_path_factory, ENV)


def test_a_seed_is_trained_as_the_main_job_trains_it(ran):
  """At config.seed, the phase functions run in memory give the main job's own models
  (trained by launch/main.py in a process of its own, with checkpoints): the same code."""
  children.check(ran, "_a_seed_is_trained_as_the_main_job_trains_it")


def _a_seed_is_trained_as_the_main_job_trains_it(job, tmp):
  config, workdir = _tiny(job, tmp)
  m = pipeline.load_models(config, workdir, log=QUIET)
  again = student_seeds.train_seed(config, m, config.seed, log=QUIET)
  main = student_seeds._trained(m)
  assert list(again) == list(main) == list(student_seeds.MODELS)
  for name in student_seeds.MODELS:
    for a, b in zip(
      jax.tree_util.tree_leaves(again[name][1]), jax.tree_util.tree_leaves(main[name][1])
    ):
      np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=F32_RTOL, atol=1e-7, err_msg=name
      )


def test_student_seeds_reports_every_seed_beside_the_main_jobs(ran):
  children.check(ran, "_student_seeds_reports_every_seed_beside_the_main_jobs")


def _student_seeds_reports_every_seed_beside_the_main_jobs(job, tmp):
  config, workdir = _tiny(job, tmp)
  out = student_seeds.run(config, workdir, log=QUIET)
  written = json.loads(pathlib.Path(workdir, "experiments", "student_seeds.json").read_text())
  assert written == json.loads(json.dumps(out)) and written["experiment"] == "student_seeds"
  assert pathlib.Path(workdir, "experiments", "student_seeds.png").stat().st_size > 1000
  assert out["seeds"] == [config.seed, config.seed + 1] and len(out["per_seed"]) == 2
  # At config.seed: the main job's models, scored as results.json scores them.
  results = json.loads(pathlib.Path(workdir, "results.json").read_text())["methods"]
  first, second = out["per_seed"]
  for name in student_seeds.MODELS:
    assert first[name]["worst_case"] == pytest.approx(results[name]["worst_case"], rel=F32_RTOL)
    np.testing.assert_allclose(
      first[name]["worst_case_interval"], results[name]["intervals"]["worst_case"], rtol=F32_RTOL
    )
    assert second[name]["worst_case"] != first[name]["worst_case"]  # trained again
  assert out["teacher_test_worst_case"] == pytest.approx(
    results["robust_gate"]["worst_case"], rel=F32_RTOL
  )
  # The student's paired differences: its worst case minus the other's, with an interval.
  for r in out["per_seed"]:
    for o in student_seeds.SAME_SIZE:
      point, lo, hi = r["student"][f"vs_{o}"]
      assert point == pytest.approx(r["student"]["worst_case"] - r[o]["worst_case"], abs=1e-6)
      assert lo < hi
  # Over seeds: mean and sd of each, and counts the per-seed intervals give.
  wc = out["worst_case"]
  assert wc["student"]["per_seed"] == [r["student"]["worst_case"] for r in out["per_seed"]]
  for o in student_seeds.SAME_SIZE:
    diffs = [r["student"][f"vs_{o}"] for r in out["per_seed"]]
    reading = out[f"vs_{o}"]
    assert reading["seeds_better"] == sum(d[2] < 0 for d in diffs)
    assert reading["seeds_worse"] == sum(d[1] > 0 for d in diffs)
    assert reading["reading"]
  assert out["student_weights"] == config.distill.weights
  assert "NaN" not in json.dumps(out)
