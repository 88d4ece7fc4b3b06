"""End-to-end: every phase launcher one by one, and the kill-and-resume guarantee (a
run SIGKILLed at any moment and started again with the same command ends with the same
results, bitwise on CPU), against the finished tiny main job (tests/test_pipeline.py)."""

import signal
import subprocess

import pytest
from test_pipeline import ENV, PHASES, _killed, _main, _results, _saved


@pytest.fixture
def tiny_run(finished_tiny_job):
  return finished_tiny_job


def test_phase_launchers_one_by_one_match_the_main_job(tiny_run, tmp_path):
  out = _main(tmp_path, launcher="train_gate")  # before its inputs exist
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "experts: nothing trained" in out.stderr and "run its phase first" in out.stderr
  for phase in PHASES:
    out = _main(tmp_path, launcher=phase)
    assert out.returncode == 0, (phase, out.stderr[-3000:])
  assert _results(tmp_path) == _results(tiny_run[0])


def test_killed_at_any_moment_resumes_to_the_same_results(tiny_run, tmp_path):
  """SIGKILLed three times (a checkpoint's metric lines written but not the checkpoint;
  right after a checkpoint; a chunk computed and nothing saved), each time started
  again; the run that finishes reports what the uninterrupted one did."""
  run = lambda *command: subprocess.run(
    command, capture_output=True, text=True, timeout=600, env=ENV
  )
  out = run(*_killed(tmp_path, "experts", 20, "before_checkpoint"))
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert _saved(tmp_path, "experts") == ([10], 20)  # metric lines ahead of the checkpoint
  out = run(*_killed(tmp_path, "robust_gate", 20, "after_save"))
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert "experts: resumed at step 10" in out.stdout and "experts: step 30/30" in out.stdout
  assert _saved(tmp_path, "experts") == ([20, 30], 30)  # the torn lines 11–20 replaced
  assert _saved(tmp_path, "robust_gate") == ([10, 20], 20)
  out = run(*_killed(tmp_path, "monolithic_dro", 20, "before_save"))
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert "robust_gate: resumed at step 20" in out.stdout
  assert _saved(tmp_path, "monolithic_dro") == ([10], 10)
  out = _main(tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "monolithic_dro: resumed at step 10" in out.stdout
  assert _results(tmp_path) == _results(tiny_run[0])
