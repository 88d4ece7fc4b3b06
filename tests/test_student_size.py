"""Students of several sizes (robust_gate.students) and the `student_size` experiment on a
tiny main job: the sizes are 1×, 2× and 4× an expert in parameters, the source is chosen on
validation's part no student trained on, and the test numbers are results.json's."""

import copy
import dataclasses
import json
import os
import pathlib
import shutil

import children
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_experiments import _written, run_here
from test_pipeline import ENV
from tolerances import F32_RTOL

from robust_gate import (
  config_files,
  data,
  distill,
  experts,
  models,
  pipeline,
  provenance,
  scoring,
  students,
)
from robust_gate.checks import InputError
from robust_gate.experiments import EXPERIMENTS, common, student_size
from robust_gate.report import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "launch", "configs")
QUIET = lambda s: None
CFG = models.LMConfig(vocab_size=6, max_len=6, d_model=16, num_layers=1, num_heads=2, d_ff=16)
GATE = models.GateConfig(num_experts=2, vocab_size=6, max_len=6)


@pytest.fixture(scope="module")
def teacher():
  """Two random experts of CFG and a gate over them (initialized under jit: Flax's eager
  initialization takes seconds)."""
  experts_M = jax.jit(models.init_stacked_lm, static_argnums=(0, 2))(CFG, jax.random.key(0), 2)
  return experts_M, jax.jit(models.init_gate, static_argnums=0)(GATE, jax.random.key(1))


def _tiny_config():
  config = copy.deepcopy(config_files.load(os.path.join(CONFIGS, "tiny.py")))
  config.experiment_seeds = 2
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, finished_tiny_job):
  """A copy of the finished tiny main job every file shares (conftest.py): the experiment
  writes into it."""
  workdir = str(shutil.copytree(finished_tiny_job[0], tmp_path_factory.mktemp("s") / "tiny"))
  return _tiny_config(), workdir


def _experiment(workdir):
  """The experiment on the tiny job, 10 steps a student (a third of the monolithic's),
  checked as tests/test_experiments.py checks every experiment's run."""
  done = run_here(workdir, 2, {"student_size": {"steps": 10}})
  assert done["student_size"]["error"] is None, done["student_size"]["error"]


# What runs in a process of its own (children.py), on the launchers' compilation cache
# (which holds the tiny job's programs, and the experiment's for the tests after it): the
# experiment, and the test bodies that restore or train models.
_IN_CHILD = (
  "_experiment",
  "_student_size_selection_part_and_held_out_source_partition_validation",
  "_student_size_students_are_normalized_models",
)


@pytest.fixture(scope="module")
def in_child(tiny, request):
  """children.run's record of what _IN_CHILD this session's tests need, one after the
  other in one child, on the tiny job's copy (the experiment writes its JSON there)."""
  need = children.selected(request, _IN_CHILD)
  if children.selected(
    request, ["_student_size_chooses_on_validation_and_reports_test_as_results_json"]
  ):
    need.insert(0, "_experiment")
  return children.run("test_student_size", {n: [tiny[1]] for n in need}, ENV)


def _expert_configs():
  """Every main-job config's expert architecture (and tiny's)."""
  for name in ("tiny", "wordfreq", "digits", "source_small", "source_h200", "wordfreq_large"):
    c = config_files.load(os.path.join(CONFIGS, f"{name}.py"))
    yield name, pipeline.phases.lm_config(c.expert, 256, c.data.max_len, c.dtype)


@pytest.mark.parametrize("name,expert", list(_expert_configs()))
def test_scaled_students_have_2x_and_4x_the_parameters_and_the_experts_head_width(name, expert):
  count = lambda c: experts.num_params(jax.eval_shape(lambda: models.init_lm(c, jax.random.key(0))))
  for ratio in (1, 2, 4):
    cfg = students.scaled(expert, ratio)
    assert students.lm_num_params(cfg) == count(cfg)  # the count the search uses is exact
    assert abs(count(cfg) / count(expert) / ratio - 1) <= 0.1, (name, ratio, cfg)
    assert cfg.d_model // cfg.num_heads == expert.d_model // expert.num_heads
    assert cfg.d_model % cfg.num_heads == 0 and cfg.d_ff / cfg.d_model == pytest.approx(
      expert.d_ff / expert.d_model, rel=0.05
    )
  assert students.scaled(expert, 1) == expert


def test_distill_loss_of_an_expert_sized_student_is_the_main_jobs(teacher):
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 6, size=rng.integers(1, 5)) for _ in range(40)]
  d = data.encode(seqs, np.arange(40) % 2, ["a", "b"], vocab_size=6, max_len=6)
  experts_M, gate = teacher
  init = jax.jit(models.init_lm, static_argnums=0)
  student = init(CFG, jax.random.key(2))
  key = jax.random.key(3)
  losses = lambda loss_fn, params: jax.jit(loss_fn)(params, None, key)  # eager is slow
  ours = losses(students.distill_loss_fn(CFG, experts_M, GATE, gate, CFG, d, 8), student)
  main = losses(distill.distill_loss_fn(CFG, experts_M, GATE, gate, d, 8), student)
  np.testing.assert_allclose(ours, main, rtol=F32_RTOL)
  assert ours.shape == (2,) and np.all(np.asarray(ours) > 0)
  wider = dataclasses.replace(CFG, d_model=32, num_heads=4)
  big = init(wider, jax.random.key(2))
  kl_K = losses(students.distill_loss_fn(CFG, experts_M, GATE, gate, wider, d, 8), big)
  assert kl_K.shape == (2,) and np.all(np.isfinite(kl_K)) and np.all(np.asarray(kl_K) > 0)
  with pytest.raises(InputError, match="vocabulary and context"):
    students.distill_loss_fn(
      CFG, experts_M, GATE, gate, dataclasses.replace(CFG, vocab_size=7), d, 8
    )


def test_teacher_samples_are_laid_out_as_data_and_reproducible(teacher):
  experts_M, gate = teacher
  key = jax.random.key(5)
  d = students.teacher_samples(CFG, experts_M, GATE, gate, key, 10, batch_size=4)
  assert d.inputs_NxT.shape == (10, 6) and d.domains == (students.TEACHER,)
  assert np.all(d.domain_N == 0) and d.vocab_size == 6
  np.testing.assert_array_equal(d.inputs_NxT[:, 1:], d.targets_NxT[:, :-1])
  assert np.all(d.inputs_NxT[:, 0] == 0) and np.all(d.mask_NxT[:, 0])
  length_N = d.mask_NxT.sum(1)  # the mask is a prefix, ended by EOS where it ends early
  np.testing.assert_array_equal(d.mask_NxT, np.arange(6)[None] < length_N[:, None])
  early = length_N < 6
  assert np.all(d.targets_NxT[early, length_N[early] - 1] == 0)
  assert np.all(d.targets_NxT[np.arange(10), np.minimum(length_N, 6) - 1][~early] >= 0)
  again = students.teacher_samples(CFG, experts_M, GATE, gate, key, 10, batch_size=4)
  np.testing.assert_array_equal(again.targets_NxT, d.targets_NxT)


def test_lm_logprobs_are_the_models_on_every_observed_token():
  rng = np.random.default_rng(1)
  seqs = [rng.integers(1, 6, size=rng.integers(1, 5)) for _ in range(7)]
  d = data.encode(seqs, np.zeros(7, int), ["a"], vocab_size=6, max_len=6)
  params = jax.jit(models.init_lm, static_argnums=0)(CFG, jax.random.key(0))
  want = models.token_logprobs(CFG, params, jnp.asarray(d.inputs_NxT), jnp.asarray(d.targets_NxT))
  got = students.lm_logprobs(CFG, params, d, batch_size=3)  # three batches, the last padded
  np.testing.assert_allclose(got, np.where(d.mask_NxT, want, 0.0), rtol=F32_RTOL, atol=1e-6)


def test_student_size_settings_default_to_the_monolithic_and_refuse_bad_fields():
  config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
  s = student_size.settings(config)
  mc = config.monolithic
  assert (s.steps, s.per_domain, s.lr) == (mc.steps, mc.per_domain, mc.lr)
  assert s.sizes == (1.0, 2.0, 4.0) and s.sources == student_size.SOURCES
  assert student_size.settings(config, sizes=(4, 1)).sizes == (1.0, 4.0)
  # The config's own section, where it has one; run's keyword arguments over it.
  config.student_size = ml_collections.ConfigDict({"steps": 7, "sources": ("held_out",)})
  s = student_size.settings(config, per_domain=16)
  assert (s.steps, s.per_domain, s.sources, s.lr) == (7, 16, ("held_out",), mc.lr)
  # The domains' weights: config.distill's unless told.
  assert s.weights == config.distill.weights == "uniform"
  assert student_size.settings(config, weights="lam_bar").weights == "lam_bar"
  for bad, match in (
    ({"weights": "lambda"}, "student_size.weights='lambda'"),
    ({"nosuch": 1}, "no setting 'nosuch'"),
    ({"sizes": (2, 4)}, "1 among them"),
    ({"sources": ("train", "test")}, "distinct names"),
    ({"steps": 1.5}, "steps"),
  ):
    with pytest.raises(InputError, match=match):
      student_size.settings(config, **bad)


def _rows(d) -> list[bytes]:
  """The sequences of `d` as a sorted multiset."""
  return sorted(x.tobytes() + y.tobytes() for x, y in zip(d.inputs_NxT, d.targets_NxT))


def test_student_size_selection_part_and_held_out_source_partition_validation(in_child):
  """With the dual holdout, the parts are the gates' (fit, holdout); without one, halves
  of validation drawn from config.seed; either way they partition validation, and the
  selection part's b_k is its own."""
  children.check(in_child, "_student_size_selection_part_and_held_out_source_partition_validation")


def _student_size_selection_part_and_held_out_source_partition_validation(workdir):
  config = _tiny_config()
  m = pipeline.load_models(config, workdir, log=QUIET)
  va = m.caches.validation
  for fraction in (config.gate.dual_holdout, 0.0):
    c = copy.deepcopy(config)
    c.gate.dual_holdout = fraction
    caches = m.caches if fraction else dataclasses.replace(m.caches, fit=va, holdout=None)
    parts = student_size.validation_parts(c, caches)
    held, sel = parts.held_out, parts.selection
    np.testing.assert_array_equal(held.counts() + sel.data.counts(), va.data.counts())
    assert np.all(held.counts() > 0) and np.all(sel.data.counts() > 0)
    both = dataclasses.replace(
      held,
      inputs_NxT=np.concatenate([held.inputs_NxT, sel.data.inputs_NxT]),
      targets_NxT=np.concatenate([held.targets_NxT, sel.data.targets_NxT]),
    )
    assert _rows(both) == _rows(va.data)
    want_b = scoring.baseline(c, sel.cache_NxTxM, sel.data)
    np.testing.assert_allclose(sel.baseline_K, want_b, rtol=F32_RTOL)
    assert ("dual-holdout part" in parts.selection_is) == bool(fraction)


def test_student_size_chooses_on_validation_and_reports_test_as_results_json(tiny, in_child):
  config, workdir = tiny
  children.check(in_child, "_experiment")
  out = _written(tiny, "student_size")
  written = json.loads(pathlib.Path(workdir, "experiments", "student_size.json").read_text())
  assert written == out and written["experiment"] == "student_size"  # `_run` read it back
  assert list(written[provenance.INPUTS_KEY]) == [*provenance.MODEL_DIRS, "results.json"]
  assert pathlib.Path(workdir, "experiments", "student_size.png").stat().st_size > 1000
  flat = json.dumps(out)
  assert "NaN" not in flat and "Infinity" not in flat
  assert out["seeds"] == common.seeds(config)
  # The choice: the smallest mean validation worst case of the 1× students, per seed as
  # recorded beside each student's test numbers.
  val = {n: e["validation_worst_case"] for n, e in out["sources"].items()}
  assert set(val) == set(student_size.SOURCES)
  assert out["chosen_source"] == min(val, key=lambda n: val[n]["mean"])
  for n, v in val.items():
    per_seed = [r["students"][f"student_{n}_1x"]["validation_worst_case"] for r in out["per_seed"]]
    assert v["per_seed"] == per_seed
    test = out["sources"][n]["worst_case"]["per_seed"]
    assert per_seed != test  # measured on validation's part, not on test
  assert "holdout" in out["selection_is"] and "test never chooses" in out["chosen_on"]
  assert out["weights"] == config.distill.weights
  # Sizes: 1×, 2× and 4× an expert within 10%; the 1× is the expert's architecture.
  sizes = out["sizes"]
  assert list(sizes) == ["1x", "2x", "4x"]
  assert sizes["1x"]["params"] == out["expert_params"]
  for r, e in zip((1, 2, 4), sizes.values()):
    assert abs(e["params_over_expert"] / r - 1) <= 0.1
    assert e["compute_over_monolithic"] == pytest.approx(e["params_over_expert"] * 10 / 30)
  assert sizes["1x"]["worst_case"] == out["sources"][out["chosen_source"]]["worst_case"]
  # Finite numbers; each gap is the worst case minus the teacher's, on the same resamples.
  teacher = out["teacher_test_worst_case"]
  for r in out["per_seed"]:
    for e in r["students"].values():
      assert np.isfinite(e["worst_case"]) and np.isfinite(e["validation_worst_case"])
      assert e["gap"][0] == pytest.approx(e["worst_case"] - teacher, abs=1e-6)
      lo, hi = e["worst_case_interval"]
      assert lo < hi and e["gap"][1] < e["gap"][2]
      assert e["vs_monolithic_dro"][0] == pytest.approx(
        e["worst_case"] - out["baselines"]["monolithic_dro"]["worst_case"], abs=1e-6
      )
  # The main job's models and the teacher on test: results.json's numbers and intervals.
  results = json.loads(pathlib.Path(workdir, "results.json").read_text())["methods"]
  assert teacher == pytest.approx(results["robust_gate"]["worst_case"], rel=F32_RTOL)
  for n, e in out["baselines"].items():
    assert e["worst_case"] == pytest.approx(results[n]["worst_case"], rel=F32_RTOL)
    np.testing.assert_allclose(
      e["worst_case_interval"], results[n]["intervals"]["worst_case"], rtol=F32_RTOL
    )
    np.testing.assert_allclose(
      e["gap"], results[n]["vs_robust_gate"]["worst_case"], rtol=F32_RTOL, atol=1e-6
    )
  assert out["baselines"]["monolithic"]["compute_over_monolithic"] == 1.0
  assert out["teacher_samples"]["sequences"] == out["sources"]["teacher_samples"]["sequences"]
  assert out["sources"]["held_out"]["sequences"] == out["teacher_samples"]["sequences"]
  assert sum(out["teacher_samples"]["likeliest_expert_fraction"].values()) == pytest.approx(1.0)


def test_student_size_students_are_normalized_models(in_child):
  """A student of each size is a normalized next-token model over the teacher's vocabulary
  after distillation on the teacher's samples (every source's loss is finite)."""
  children.check(in_child, "_student_size_students_are_normalized_models")


def _student_size_students_are_normalized_models(workdir):
  config = _tiny_config()
  m = pipeline.load_models(config, workdir, log=QUIET)
  s = student_size.settings(config, steps=2)
  parts = student_size.validation_parts(config, m.caches)
  found, _ = student_size.sources(m, parts, s, config.seed, QUIET)
  # The data sources' domains weighted as config.distill says (uniform), or by λ̄.
  lam = np.asarray(m.gates.robust_gate.state.lam_avg_K, np.float64)
  for n in ("train", "held_out"):
    np.testing.assert_allclose(found[n].lam_K, np.full(len(lam), 1 / len(lam)), rtol=F32_RTOL)
  by_lam, _ = student_size.sources(
    m, parts, dataclasses.replace(s, weights="lam_bar", sources=("train",)), 0, QUIET
  )
  np.testing.assert_allclose(by_lam["train"].lam_K, lam / lam.sum(), rtol=F32_RTOL)
  x = jnp.asarray(m.splits.test.inputs_NxT[:8])
  for ratio in (1, 2):
    cfg = students.scaled(m.experts.lm_cfg, ratio)
    st = student_size.distill_and_validate(
      m, cfg, found["teacher_samples"], parts.selection, s, config, f"x{ratio}", QUIET
    )
    assert len(st.params) == 2 and np.all(np.isfinite(st.validation_worst_case))
    p = np.exp(np.asarray(models.next_token_logprobs(cfg, st.params[0], x), np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert not all(  # the seeds differ
      np.array_equal(a, b)
      for a, b in zip(
        jax.tree_util.tree_leaves(st.params[0]), jax.tree_util.tree_leaves(st.params[1])
      )
    )


def test_student_size_is_registered_for_the_launcher_and_the_report():
  assert EXPERIMENTS["student_size"] is student_size.run
  assert "student_size" in inputs.EXPERIMENT_ORDER
