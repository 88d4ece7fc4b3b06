"""Hostile inputs: one clear line, no traceback, nothing trained or lost.

What absl's flag parsing decides (an override naming no field, a value that does not
parse) runs the launcher in a process of its own; everything else calls the
launchers' body (`cli.run_phase`, `cli.main`) in this process, with faults injected
by monkeypatch.
"""

import errno
import os
import subprocess
import sys
import traceback

import pytest

from robust_gate import checkpoint_job, checkpoints, cli, config_files, pipeline
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
QUIET = lambda s: None


def _launch(workdir, *args, config=True):
  """launch/main.py in a process of its own (with the tiny config unless config=False)."""
  command = [sys.executable, os.path.join(ROOT, "launch", "main.py"), f"--workdir={workdir}"]
  return subprocess.run(
    [*command, *([f"--config={TINY}"] if config else []), *args],
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["--config.gate.nosuch=1"], "unknown config field 'nosuch' in --config.gate.nosuch=1"),
    (["--config.data.options.nosuch=1"], "unknown config field 'nosuch'"),
    (["--config.gate.step=3"], "unknown config field 'step' in --config.gate.step=3 (Did you"),
    (["--config.gate.steps=abc"], "flag --config.gate.steps=abc: invalid literal for int"),
    (["--config.gate.steps=-3"], "config.gate.steps=-3 must be finite and > 0"),
    (["--config.expert.lr=0"], "config.expert.lr=0.0 must be finite and > 0"),  # 0 → float
  ],
)
def test_a_bad_flag_is_one_clear_line_before_any_training(tmp_path, overrides, message):
  out = _launch(tmp_path, *overrides)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "experts").exists()  # refused before any model was trained


def test_an_unknown_field_is_one_line_without_config_too(tmp_path):
  """Without --config, ml_collections applies the overrides to the default file when
  the flag is defined, not when the flags are parsed: the same one line."""
  out = _launch(tmp_path, "--config.gate.nosuch=1", config=False)
  assert out.returncode != 0
  assert "robust_gate: unknown config field 'nosuch'" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def tiny(**fields):
  """The tiny config with `fields` ("section.key": value) set."""
  config = config_files.load(TINY)
  for path, value in fields.items():
    *sections, key = path.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


def one_line(phase, config, workdir, log=QUIET) -> str:
  """The one line the launchers print for `phase`'s error (cli.run_phase's SystemExit)."""
  with pytest.raises(SystemExit) as info:
    cli.run_phase(phase, config, str(workdir), log)
  message = info.value.code
  assert isinstance(message, str) and message.startswith("robust_gate: ")
  assert "\n" not in message
  return message


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"gate.lr": float("nan")}, "config.gate.lr=nan must be finite and > 0"),
    ({"gate.ema_decay": 1.0}, "config.gate.ema_decay=1.0 must be in [0, 1)"),
    ({"expert.d_model": 0}, "config.expert.d_model=0 must be finite and > 0"),
    ({"monolithic.dro_dual_lr": -0.5}, "config.monolithic.dro_dual_lr=-0.5 must be finite and ≥ 0"),
    ({"gate.token_embed": -1}, "config.gate.token_embed=-1 must be finite and ≥ 0"),
    ({"checkpoint_every": 0}, "config.checkpoint_every=0 must be a positive int"),
    ({"dtype": "float16"}, "config.dtype='float16' must be one of"),
    ({"baseline": "oracle"}, "unknown config.baseline 'oracle'"),
    ({"uncertainty": "box", "box_lo": 0.5}, "box admits no mixture"),
    ({"uncertainty": "box", "box_hi": 1.5}, "inside the simplex"),
    ({"data.options.num_domains": 0}, "num_domains=0 must be positive"),
    # From Python, ml_collections adds a misspelled field silently: refused here.
    ({"expert.stepz": 3}, "config.expert.stepz is not a field of config.expert"),
    ({"distill.weights": "lambda"}, "config.distill.weights='lambda' must be one of"),
  ],
)
def test_a_bad_config_value_is_one_clear_line_before_any_training(tmp_path, fields, message):
  assert message in one_line(pipeline.run, tiny(**fields), tmp_path)
  assert not (tmp_path / "experts").exists()  # refused before any model was trained


def test_a_config_without_a_field_is_one_clear_line(tmp_path):
  """A config file written before a field was added (here config.distill.weights)."""
  config = tiny()
  del config.distill["weights"]
  message = one_line(pipeline.run, config, tmp_path)
  assert "config.distill lacks the field 'weights'" in message
  assert not (tmp_path / "experts").exists()


def test_the_checkpoint_job_refuses_a_misspelled_field_before_loading_anything(tmp_path):
  config = config_files.load(os.path.join(os.path.dirname(TINY), "checkpoints_example.py"))
  config.gate.dual_lrr = 0.1
  config.experts = {"a": str(tmp_path / "no_such_checkpoint")}
  with pytest.raises(InputError, match=r"config\.gate\.dual_lrr is not a field of config\.gate"):
    checkpoint_job.run(config, str(tmp_path / "job"), log=QUIET)
  del config.gate["dual_lrr"]
  del config.distill["weights"]  # a copy of the example made before the field existed
  with pytest.raises(
    InputError,
    match=r"config\.distill lacks the field 'weights'; launch/configs/checkpoints_example\.py sets",
  ):
    checkpoint_job.run(config, str(tmp_path / "job"), log=QUIET)
  assert not (tmp_path / "job").exists()


def _deny(monkeypatch):
  """os.makedirs refuses paths containing 'denied' (the tests may run as root, whom
  permissions do not stop)."""
  makedirs = os.makedirs

  def refusing(path, *args, **kwargs):
    if "denied" in str(path):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, "makedirs", refusing)


def test_a_workdir_under_proc_is_a_clear_error():
  message = "cannot use --workdir='/proc/robust_gate_test'"
  assert message in one_line(pipeline.train_experts, tiny(), "/proc/robust_gate_test")


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("not a directory")
  assert f"cannot use --workdir='{workdir}'" in one_line(pipeline.train_experts, tiny(), workdir)


def test_a_workdir_without_permission_is_a_clear_error(tmp_path, monkeypatch):
  workdir = tmp_path / "denied"
  _deny(monkeypatch)
  message = f"cannot use --workdir='{workdir}': Permission denied."
  assert message in one_line(pipeline.train_experts, tiny(), workdir)


def test_a_full_disk_mid_run_loses_nothing_and_resumes(tmp_path, monkeypatch):
  """ENOSPC on the second checkpoint: one line, the first stays good, a rerun resumes."""
  save = checkpoints.Checkpointer.save

  def full_from_step_20(self, state, metrics, **kwargs):
    if int(state.step) >= 20:
      raise OSError(errno.ENOSPC, "No space left on device", self.directory)
    save(self, state, metrics, **kwargs)

  config = tiny()
  with monkeypatch.context() as patch:
    patch.setattr(checkpoints.Checkpointer, "save", full_from_step_20)
    message = one_line(pipeline.train_experts, config, tmp_path)
  assert message.startswith(f"robust_gate: cannot write {tmp_path / 'experts'} in the workdir: ")
  assert "No space left on device" in message and "free space" in message
  assert sorted(p.name for p in (tmp_path / "experts" / "checkpoints").iterdir()) == ["10"]
  lines = []  # space freed: the same command again
  cli.run_phase(pipeline.train_experts, config, str(tmp_path), lines.append)
  assert "experts: resumed at step 10" in "\n".join(lines)
  assert "experts: step 30/30" in "\n".join(lines)


def test_a_path_outside_the_workdir_is_named_as_itself(tmp_path, monkeypatch):
  """EACCES on a file elsewhere (a shared data dir) names that file, not the workdir."""
  elsewhere = "/shared/tfds/robust_gate_markov"

  def refused(config, workdir, log):
    raise PermissionError(errno.EACCES, "Permission denied", elsewhere)

  monkeypatch.setattr(pipeline, "_splits", refused)
  message = one_line(pipeline.train_experts, tiny(), tmp_path)
  assert message.startswith(f"robust_gate: cannot access {elsewhere}: Permission denied.")
  assert "fix its permissions" in message


def test_a_diverging_run_is_one_line_and_saves_nothing_of_it(tmp_path):
  """A learning rate of 1e6: the experts' loss overflows within the first chunk."""
  message = one_line(pipeline.train_experts, tiny(**{"expert.lr": 1e6}), tmp_path)
  assert message.startswith("robust_gate: experts diverged: non-finite per-domain loss or λ")
  assert "Nothing of steps 1–10 was saved" in message
  assert "lower the learning rate of experts" in message
  assert checkpoints.saved_steps(str(tmp_path / "experts")) == []
  assert checkpoints.read_metrics(str(tmp_path / "experts")) == []


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
