"""Hostile configs through the launchers: one clear line, no traceback, nothing trained."""

import os
import subprocess
import sys
import traceback

import pytest

from robust_gate import cli, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["--config.gate.nosuch=1"], "unknown config field 'nosuch'"),
    (["--config.gate.steps=abc"], "flag --config.gate.steps=abc: invalid literal for int"),
    (["--config.gate.steps=-3"], "config.gate.steps=-3 must be finite and > 0"),
    (["--config.gate.lr=nan"], "config.gate.lr=nan must be finite and > 0"),
    (["--config.gate.ema_decay=1.0"], "config.gate.ema_decay=1.0 must be in [0, 1)"),
    (["--config.expert.lr=0"], "config.expert.lr=0.0 must be finite and > 0"),
    (["--config.expert.d_model=0"], "config.expert.d_model=0 must be finite and > 0"),
    (["--config.checkpoint_every=0"], "config.checkpoint_every=0 must be a positive int"),
    (["--config.dtype=float16"], "config.dtype='float16' must be one of"),
    (["--config.uncertainty=box", "--config.box_lo=0.5"], "box admits no mixture"),
    (["--config.uncertainty=box", "--config.box_hi=1.5"], "inside the simplex"),
    (["--config.data.options.num_domains=0"], "num_domains=0 must be positive"),
  ],
)
def test_bad_config_is_one_clear_line_before_any_training(tmp_path, overrides, message):
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "main.py"),
      f"--workdir={tmp_path}",
      f"--config={TINY}",
      *overrides,
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "experts").exists()  # refused before any model was trained


def _launch(launcher, workdir, *args, prelude=""):
  """Runs a launcher; `prelude` is Python run first in the same process (fault injection)."""
  code = (
    f"import runpy, sys\n{prelude}\n"
    f"sys.argv = ['{launcher}.py'] + sys.argv[1:]\n"
    f"runpy.run_path({os.path.join(ROOT, 'launch', launcher + '.py')!r}, "
    f"run_name='__main__')"
  )
  return subprocess.run(
    [sys.executable, "-c", code, f"--workdir={workdir}", f"--config={TINY}", *args],
    capture_output=True,
    text=True,
    timeout=300,
  )


# Permission denied is injected (the tests may run as root, whom permissions do not stop).
NO_PERMISSION = (
  "import errno, os\n_makedirs = os.makedirs\n"
  "def makedirs(path, *a, **k):\n"
  "  if 'denied' in str(path):\n"
  "    raise PermissionError(errno.EACCES, 'Permission denied', str(path))\n"
  "  return _makedirs(path, *a, **k)\n"
  "os.makedirs = makedirs"
)


@pytest.mark.parametrize(
  "workdir, prelude, message",
  [
    ("/proc/robust_gate_test", "", "cannot use --workdir='/proc/robust_gate_test'"),
    ("FILE", "", "cannot use --workdir="),
    ("DENIED", NO_PERMISSION, "Permission denied"),
  ],
)
def test_a_workdir_that_cannot_be_created_is_a_clear_error(tmp_path, workdir, prelude, message):
  if workdir == "FILE":
    workdir = tmp_path / "a_file"
    workdir.write_text("not a directory")
  elif workdir == "DENIED":
    workdir = tmp_path / "denied"
  out = _launch("train_experts", workdir, prelude=prelude)
  assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_a_full_disk_mid_run_loses_nothing_and_resumes(tmp_path):
  """ENOSPC on the second checkpoint: one line, the first stays good, a rerun resumes."""
  fault = (
    "import errno\nfrom robust_gate import checkpoints\n"
    "_save = checkpoints.Checkpointer.save\n"
    "def save(self, state, metrics):\n"
    "  if int(state.step) >= 20:\n"
    "    raise OSError(errno.ENOSPC, 'No space left on device', self.directory)\n"
    "  _save(self, state, metrics)\n"
    "checkpoints.Checkpointer.save = save"
  )
  out = _launch("train_experts", tmp_path, prelude=fault)
  assert out.returncode != 0, out.stdout[-2000:]
  assert "cannot write to the workdir" in out.stderr and "No space left" in out.stderr
  assert "Traceback" not in out.stderr
  assert sorted(p.name for p in (tmp_path / "experts" / "checkpoints").iterdir()) == ["10"]
  out = _launch("train_experts", tmp_path)  # space freed: the same command again
  assert out.returncode == 0, out.stderr[-2000:]
  assert "experts: resumed at step 10" in out.stdout
  assert "experts: step 30/30" in out.stdout


def test_a_bug_inside_a_phase_is_its_traceback_not_a_config_error(tmp_path, monkeypatch, capsys):
  """Only a --config override naming no field is "unknown config field": a KeyError
  raised inside a phase (a bug, a damaged file) leaves the launcher as itself, which
  Python reports with its traceback and exit status 1."""

  def broken(config):
    raise KeyError("lam")

  monkeypatch.setattr(pipeline, "check_config", broken)
  monkeypatch.setattr(
    sys, "argv", ["train_experts.py", f"--workdir={tmp_path}", f"--config={TINY}"]
  )
  with pytest.raises(KeyError, match="lam") as info:
    cli.main(pipeline.train_experts, TINY)
  assert "broken" in [frame.name for frame in traceback.extract_tb(info.tb)]
  assert "unknown config field" not in capsys.readouterr().err
