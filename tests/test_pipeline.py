"""End-to-end: the main job on a tiny config, rerun, refused.

The rest of the end-to-end tests, in files of their own so that pytest-xdist runs them
beside these: every phase launcher and the kill-and-resume guarantee
(test_pipeline_resume.py), 8 devices over the device budget, streaming
(test_pipeline_devices.py), 2 processes (test_pipeline_processes.py). A run SIGKILLed at
any moment and started again with the same command ends with the same results (bitwise
on CPU); the kills are deterministic: run as a script, this file is a launcher that
SIGKILLs itself at a named point of a named model's training (`_kill_self_at`).
"""

import json
import os
import pathlib
import runpy
import shutil
import signal
import subprocess
import sys

import children
import numpy as np
import pytest
from devices import COMPILATION_CACHE
from tolerances import F32_RTOL

from robust_gate import (
  certificate,
  config_files,
  experts,
  layout,
  phases,
  pipeline,
  train,
  uncertainty,
)
from robust_gate import provenance as provenance_lib
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
METHODS = [
  "robust_gate",
  "erm_gate",
  "best_response",
  "uniform_mixture",
  "posterior_gate",
  "monolithic",
  "monolithic_large",
  "monolithic_dro",
  "student",
]


PHASES = ["train_experts", "train_gate", "distill", "train_baselines", "evaluate"]


def _command(workdir, launcher="main", *overrides):
  return [
    sys.executable,
    os.path.join(ROOT, "launch", f"{launcher}.py"),
    f"--workdir={workdir}",
    f"--config={TINY}",
    *overrides,
  ]


# The launchers run as subprocesses; a shared persistent compilation cache spares
# each one the compile (the executables are the same, so are the results).
ENV = {**os.environ, **COMPILATION_CACHE}  # tests/devices.py


def run_main(workdir, *overrides, launcher="main"):
  """A launcher (the main job unless told) on the tiny config, in a process of its own."""
  return subprocess.run(
    _command(workdir, launcher, *overrides), capture_output=True, text=True, timeout=600, env=ENV
  )


_main = run_main


def _results(workdir):
  r = json.loads((workdir / "results.json").read_text())
  for timing in ("seconds", "seconds_per_model", "modular_overhead"):
    r.pop(timing, None)  # wall-clock times differ between runs
  r.pop("provenance")  # so do the date and the command line
  r.pop(provenance_lib.INPUTS_KEY)  # and each model's training date
  return r


@pytest.fixture
def tiny_run(finished_tiny_job):
  """(workdir, stdout) of the finished tiny main job every file shares (conftest.py)."""
  return finished_tiny_job


def test_main_job_writes_results_plots_and_table(tiny_run):
  workdir, stdout = tiny_run
  r = json.loads((workdir / "results.json").read_text())
  assert r["units"] == "bits/token" and r["baseline"] == "entropy"
  domains = r["domains"]
  assert domains == ["chain_0", "chain_1", "chain_2"]
  for name in METHODS + [f"expert:{d}" for d in domains]:
    m = r["methods"][name]
    assert set(m["domain_loss"]) == set(domains)
    assert np.isfinite(m["worst_case"]) and np.isfinite(m["mean"])
    np.testing.assert_allclose(m["worst_case"], max(m["domain_loss"].values()), rtol=1e-5)
    # Exact-entropy baseline: L_k is a KL divergence of a normalized model, ≥ 0
    # up to the sampling noise of 40 test sequences per domain.
    assert min(m["domain_loss"].values()) > -0.2
  lam = np.array(list(r["lambda_bar"].values()))
  assert abs(lam.sum() - 1) < 1e-5 and np.all(lam >= 0)
  for usage in r["gate_usage"].values():
    np.testing.assert_allclose(np.sum(usage, axis=1), 1.0, atol=1e-5)
  for mat in r["gradient_conflict"].values():
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-5)
  provenance = r["provenance"]  # where the numbers came from: the code, config, device
  assert provenance["command"].startswith("main.py") and provenance["platform"] == "cpu"
  assert provenance["config"]["gate"]["steps"] == 40 and provenance["commit"]
  # The student: from the expert of λ̄'s largest entry, its domains weighted as configured.
  assert r["student_init"] == max(r["lambda_bar"], key=r["lambda_bar"].get)
  assert r["student_weights"] == provenance["config"]["distill"]["weights"] == "uniform"
  # Each model names the code that trained it: one training run each, by this commit.
  trained = r[provenance_lib.INPUTS_KEY]
  assert set(trained) == set(layout.MODEL_DIRS)
  assert all(
    len(runs) == 1 and runs[0]["commit"] == provenance["commit"] for runs in trained.values()
  )
  for png in ("lambda.png", "domain_losses.png", "gate_usage.png"):
    assert (workdir / png).stat().st_size > 1000
  # Every model trained and the caches scored have their wall time; the overhead of being
  # modular is (caches + robust gate) / experts.
  seconds = r["seconds_per_model"]
  assert set(seconds) == {*layout.MODEL_DIRS, "caches"} and min(seconds.values()) > 0
  assert r["modular_overhead"] == pytest.approx(
    (seconds["caches"] + seconds["robust_gate"]) / seconds["experts"]
  )
  assert "robust_gate" in stdout and "worst" in stdout
  assert "steps/s" in stdout and "ETA" in stdout


def test_rerun_resumes_everything_and_refuses_another_config(tiny_run, tmp_path):
  workdir = shutil.copytree(tiny_run[0], tmp_path / "workdir")  # times kept: copy2
  stamp = os.path.getmtime(workdir / "cache_test.npz")
  before = _results(workdir)
  timed = json.loads((workdir / "results.json").read_text())["seconds_per_model"]
  out = _main(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  # Restoring is not training: the times stay those of the run that trained.
  assert json.loads((workdir / "results.json").read_text())["seconds_per_model"] == timed
  assert os.path.getmtime(workdir / "cache_test.npz") == stamp  # reused, not rebuilt
  for model in layout.MODEL_DIRS:
    assert f"{model}: resumed at step" in out.stdout
  assert "steps/s" not in out.stdout  # nothing trained again
  assert _results(workdir) == before
  # Everything but the TFDS data dir (which may prepare the other dataset).
  listing = lambda: sorted(str(p) for p in workdir.rglob("*") if "tfds" not in p.parts)
  files = listing()
  out = _main(workdir, "--config.data.options.examples_per_split=(60,40,41)")
  assert out.returncode != 0
  assert "different configuration" in out.stderr and "examples_per_split" in out.stderr
  assert "Traceback" not in out.stderr
  assert _results(workdir) == before  # nothing lost or mixed
  assert listing() == files


# The bodies of the tests below that train in a process (children.py): they run in one
# child on the launchers' compilation cache, which holds the tiny job's programs.
_TRAINING = (
  "_the_gates_train_gate_returns_stay_usable_in_its_process",
  "_a_robust_gate_at_dual_lr_0_plays_a_point_of_its_set",
  "_a_workdir_from_before_a_config_field_loads_at_the_field_s_old_value",
)


@pytest.fixture(scope="module")
def trained_in_child(finished_tiny_job, tmp_path_factory, request):
  """children.run's record of the selected bodies of _TRAINING, each given the finished
  tiny job and a directory of its own."""
  return children.run_on_job(request, _TRAINING, str(finished_tiny_job[0]), tmp_path_factory, ENV)


def test_the_gates_train_gate_returns_stay_usable_in_its_process(trained_in_child):
  """The best response warm-starts from the robust gate's parameters, and the run that
  trains it donates its state: the robust gate train_gate returns must survive that,
  and the best response it trains in this process is the launcher's."""
  children.check(trained_in_child, "_the_gates_train_gate_returns_stay_usable_in_its_process")


def _the_gates_train_gate_returns_stay_usable_in_its_process(job, tmp):
  job, tmp = pathlib.Path(job), pathlib.Path(tmp)
  workdir = shutil.copytree(job, tmp / "workdir")
  shutil.rmtree(workdir / "best_response")
  config, lines = config_files.load(TINY), []
  gates = pipeline.train_gate(config, str(workdir), log=lines.append)
  assert "best_response: step 40/40" in "\n".join(lines)  # trained here, not restored
  trained = {name: experts.params_fingerprint(gate.state) for name, gate in gates.items()}
  restored = pipeline.train_gate(config, str(workdir), log=lambda s: None)
  assert {name: experts.params_fingerprint(g.state) for name, g in restored.items()} == trained
  metrics = lambda w: (w / "best_response" / "metrics.jsonl").read_bytes()
  assert metrics(workdir) == metrics(job)


def test_a_robust_gate_at_dual_lr_0_plays_a_point_of_its_set(trained_in_child):
  """gate.dual_lr = 0 with a Λ that excludes the uniform mixture: λ stays at Λ's prior,
  so λ̄ is a point of the Λ evaluation's certificate maximizes over. (The config's sets
  all hold the uniform mixture; a narrower one reaches the phase through from_config.)"""
  children.check(trained_in_child, "_a_robust_gate_at_dual_lr_0_plays_a_point_of_its_set")


def _a_robust_gate_at_dual_lr_0_plays_a_point_of_its_set(job, tmp):
  config = config_files.load(TINY)
  caches = pipeline.load_models(config, job, log=lambda s: None).caches
  box = uncertainty.box([0.5, 0.1, 0.1], [0.8, 0.4, 0.4])
  config.gate.dual_lr = 0.0
  quiet = lambda s: None
  fit = lambda game: train.fit(game.step, game.state, game.steps, name=game.name, log=quiet)[0]
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(uncertainty, "from_config", lambda config, num_domains: box)
    robust = phases.train_gates(config, caches, fit).robust_gate.state
  np.testing.assert_allclose(robust.lam_avg_K, box.prior_K, rtol=F32_RTOL)
  np.testing.assert_allclose(robust.lam_K, box.prior_K, rtol=F32_RTOL)
  certificate.check_in_set(robust.lam_avg_K, box, "lam_bar_K")  # as evaluation checks it


def _kill_self_at(model: str, step: int, point: str) -> None:
  """Makes this process SIGKILL itself when `model` saves the chunk ending at `step`.

  point: "before_save" (the chunk computed, nothing of it written), "before_checkpoint"
  (its metric lines appended, its checkpoint not committed) or "after_save" (both).
  """
  from robust_gate import checkpoints  # pylint: disable=g-import-not-at-top

  save = checkpoints.Checkpointer.save
  die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)

  def save_then_die(self, state, metrics, **kwargs):
    if self.name != model or int(state.step) != step:
      return save(self, state, metrics, **kwargs)
    if point == "before_save":
      die()
    if point == "before_checkpoint":
      self._manager.save = die  # the orbax commit that follows the metric lines
    save(self, state, metrics, **kwargs)
    die()

  checkpoints.Checkpointer.save = save_then_die


def _killed(workdir, model, step, point, *args):
  """The main job's command, dying at `point` of `model`'s step `step`."""
  return [sys.executable, __file__, model, str(step), point, *_command(workdir, "main", *args)[1:]]


def _saved(workdir, model):
  """(checkpoint steps, last metric line's step) of a model's directory."""
  directory = workdir / model
  steps = sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())
  lines = (directory / "metrics.jsonl").read_text().splitlines()
  return steps, json.loads(lines[-1])["step"]


def test_bad_config_is_a_clear_error(tmp_path):
  out = _main(tmp_path, "--config.baseline=oracle")
  assert out.returncode != 0 and "unknown config.baseline 'oracle'" in out.stderr
  out = _main(tmp_path, "--config.data.options.num_domains=0")
  assert out.returncode != 0 and "Traceback" not in out.stderr


def _assert_same_results(one, eight):
  np.testing.assert_allclose(
    list(eight["lambda_bar"].values()), list(one["lambda_bar"].values()), rtol=1e-5
  )
  for name, m in one["methods"].items():
    for key in ("domain_loss", "domain_ce"):
      np.testing.assert_allclose(
        list(eight["methods"][name][key].values()),
        list(m[key].values()),
        rtol=1e-5,
        atol=1e-6,
        err_msg=name,
      )
  for name, use in one["gate_usage"].items():
    np.testing.assert_allclose(eight["gate_usage"][name], use, rtol=1e-5, atol=1e-6)


def test_a_workdir_from_before_a_config_field_loads_at_the_field_s_old_value(trained_in_child):
  """A workdir made before config.distill.weights existed: its student was distilled
  with λ̄ and its config.json lacks the field. saved_config gives it the old value, so
  load_models restores that student; the new default is refused, naming the field."""
  children.check(
    trained_in_child, "_a_workdir_from_before_a_config_field_loads_at_the_field_s_old_value"
  )


def _a_workdir_from_before_a_config_field_loads_at_the_field_s_old_value(job, tmp):
  workdir = shutil.copytree(job, pathlib.Path(tmp) / "workdir")
  shutil.rmtree(workdir / "student")
  old = config_files.load(TINY)
  old.distill.weights = "lam_bar"
  distilled = pipeline.distill_student(old, str(workdir), log=lambda s: None)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["distill"]["weights"]  # as such a workdir wrote it
  (workdir / "config.json").write_text(json.dumps(saved))
  config = pipeline.saved_config(str(workdir))
  assert config.distill.weights == "lam_bar"
  models = pipeline.load_models(config, str(workdir), log=lambda s: None)
  assert experts.params_fingerprint(models.student.params) == experts.params_fingerprint(
    distilled.params
  )
  with pytest.raises(
    InputError, match=r"different configuration .*distill\.weights: saved \(absent\), now 'uniform'"
  ):
    pipeline.distill_student(config_files.load(TINY), str(workdir), log=lambda s: None)


if __name__ == "__main__":  # python tests/test_pipeline.py MODEL STEP POINT LAUNCHER ARGS...
  _kill_self_at(sys.argv[1], int(sys.argv[2]), sys.argv[3])
  sys.argv = sys.argv[4:]
  runpy.run_path(sys.argv[0], run_name="__main__")
