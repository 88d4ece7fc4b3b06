"""Nothing lost, nothing silent, one run per workdir: a hostile sweep on a finished job.

Every case ends in one of three ways: the workdir resumes to the same results, the run
is refused with one line, or a repair is announced; nothing already saved is lost. The
launchers' body (`cli.run_phase`) runs in this process on copies of one finished tiny
job, or, where a test trains or evaluates, in one child on the launchers' compilation
cache (children.py); processes of their own where two runs must be alive at once (the
lock).
"""

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import traceback

import children
import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from test_hostile import QUIET, ROOT, TINY, one_line, tiny
from test_pipeline import ENV

from robust_gate import checkpoints, cli, phases, pipeline, provenance, workdirs
from robust_gate.checks import InputError

EVERYTHING_BUILT_FROM_EXPERTS = (
  "cache_validation.npz, cache_test.npz, robust_gate, erm_gate, best_response, student, "
  "monolithic, monolithic_dro, monolithic_large"
)


@pytest.fixture
def finished(finished_tiny_job):
  """The finished tiny main job every file shares (conftest.py), never changed here."""
  return finished_tiny_job[0]


def _copy(finished, tmp_path):
  return shutil.copytree(finished, tmp_path / "workdir")


def _files(workdir) -> dict:
  """Every file but the lock, with its size, modification time and content."""
  return {
    str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
    for p in workdir.rglob("*")
    if p.is_file() and p.name != workdirs.LOCK
  }


def _results(workdir) -> dict:
  r = json.loads((workdir / "results.json").read_text())
  for timing in ("seconds", "seconds_per_model", "modular_overhead"):
    r.pop(timing, None)
  r.pop("provenance")  # the date and the command line
  r.pop(provenance.INPUTS_KEY)  # each model's training date
  return r


@pytest.mark.parametrize(
  "field, steps, model, phase, built",
  [
    ("expert.steps", 50, "experts", pipeline.train_experts, EVERYTHING_BUILT_FROM_EXPERTS),
    ("gate.steps", 80, "robust_gate", pipeline.train_gate, "best_response, student"),
  ],
)
def test_extending_a_model_others_were_built_from_is_refused_up_front(
  finished, tmp_path, field, steps, model, phase, built
):
  """By the main job and by the model's own phase: refused before any data is read,
  with every file (checkpoints, metrics, caches, config.json) as it was."""
  workdir = _copy(finished, tmp_path)
  before = _files(workdir)
  for launcher in (pipeline.run, phase):
    message = one_line(launcher, tiny(**{field: steps}), workdir)
    assert f"config.{field}={steps} would train {model} on from its checkpoint" in message
    assert f"but {built} in {workdir} were built from it" in message
    assert f"copy {workdir / model} into a new --workdir" in message
  assert _files(workdir) == before


def test_the_original_command_finishes_the_same_after_extensions(trained_in_child):
  """A refused extension, then an allowed one (nothing is built from the monolithic
  baselines): the finished 30-step checkpoints stay, and the original command ends
  with the original results, every number."""
  children.check(trained_in_child, "_the_original_command_finishes_the_same_after_extensions")


def _the_original_command_finishes_the_same_after_extensions(finished, tmp):
  finished, tmp_path = pathlib.Path(finished), pathlib.Path(tmp)
  workdir = _copy(finished, tmp_path)
  one_line(pipeline.run, tiny(**{"expert.steps": 50}), workdir)
  lines = []
  cli.run_phase(
    pipeline.train_baselines, tiny(**{"monolithic.steps": 40}), str(workdir), lines.append
  )
  assert "monolithic_dro: step 40/40" in "\n".join(lines)
  for model in ("monolithic", "monolithic_dro"):
    assert checkpoints.saved_steps(str(workdir / model)) == [30, 40]
  lines = []
  cli.run_phase(pipeline.run, tiny(), str(workdir), lines.append)
  assert "monolithic_dro: resumed at step 30" in "\n".join(lines)
  assert "steps/s" not in "\n".join(lines)  # nothing trained again
  assert _results(workdir) == _results(finished)
  assert json.loads((workdir / "config.json").read_text())["monolithic"]["steps"] == 30


def test_a_damaged_spec_json_is_one_line_naming_it(trained_in_child):
  children.check(trained_in_child, "_a_damaged_spec_json_is_one_line_naming_it")


def _a_damaged_spec_json_is_one_line_naming_it(finished, tmp):
  workdir = _copy(pathlib.Path(finished), pathlib.Path(tmp))
  spec = workdir / "robust_gate" / "spec.json"
  spec.write_text(spec.read_text()[:40])  # truncated
  message = one_line(pipeline.train_gate, tiny(), workdir)
  assert f"{spec} is damaged" in message
  assert f"delete {workdir / 'robust_gate'} to train robust_gate again" in message


def test_lost_metric_rows_are_announced_evaluated_around_and_rebuilt(trained_in_child):
  """metrics.jsonl deleted: evaluate announces the gap and leaves it out of the λ plot;
  the model's phase run again rebuilds the file by replay, as it was."""
  children.check(trained_in_child, "_lost_metric_rows_are_announced_evaluated_around_and_rebuilt")


def _lost_metric_rows_are_announced_evaluated_around_and_rebuilt(finished, tmp):
  finished, tmp_path = pathlib.Path(finished), pathlib.Path(tmp)
  workdir = _copy(finished, tmp_path)
  path = workdir / "robust_gate" / "metrics.jsonl"
  original = path.read_text()
  path.unlink()
  lines = []
  cli.run_phase(pipeline.evaluate_all, tiny(), str(workdir), lines.append)
  assert f"note: {path} lacks the metric rows of steps 1–40: lambda.png leaves" in "\n".join(lines)
  assert _results(workdir) == _results(finished)
  lines = []
  cli.run_phase(pipeline.train_gate, tiny(), str(workdir), lines.append)
  log = "\n".join(lines)
  assert f"robust_gate: {path} lacks the metric rows of steps 1–40 of the checkpoint's 40" in log
  assert f"robust_gate: rebuilt steps 1–40 of {path}; the replay's digest matches." in log
  assert path.read_text() == original


# The bodies of the tests above that restore, train and evaluate the tiny job's models
# (children.py; the damaged spec.json's reads the data and caches before its refusal):
# they run one after the other in one child on the launchers' compilation cache, which
# holds the tiny job's programs, instead of compiling them in this worker.
_TRAINING = (
  "_the_original_command_finishes_the_same_after_extensions",
  "_a_damaged_spec_json_is_one_line_naming_it",
  "_lost_metric_rows_are_announced_evaluated_around_and_rebuilt",
)


@pytest.fixture(scope="module")
def trained_in_child(finished_tiny_job, tmp_path_factory, request):
  """children.run's record of the selected bodies of _TRAINING, each given the finished
  tiny job (never changed: each body copies it) and a directory of its own."""
  return children.run_on_job(request, _TRAINING, str(finished_tiny_job[0]), tmp_path_factory, ENV)


def test_a_bug_inside_a_phase_propagates_and_releases_the_lock(tmp_path, monkeypatch):
  """A KeyError deep in a phase is a bug: its traceback, not a one-line error, and the
  workdir is free again afterwards."""

  def broken(*args):
    raise KeyError("lam")

  monkeypatch.setattr(phases, "train_experts", broken)
  with pytest.raises(KeyError, match="lam") as info:
    cli.run_phase(pipeline.run, tiny(), str(tmp_path), QUIET)
  assert "broken" in [frame.name for frame in traceback.extract_tb(info.tb)]
  assert (tmp_path / workdirs.LOCK).read_text() == ""


# ----------------------------------------------------------------- the lock

_HOLD = """import sys
from robust_gate import workdirs
with workdirs.lock(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


@contextlib.contextmanager
def _held(workdir):
  """Another process holding the workdir's lock until the block ends (or it is killed)."""
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
  )
  try:
    assert holder.stdout.readline() == b"held\n"
    yield holder
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)


def test_a_second_run_on_a_workdir_is_refused(tmp_path, monkeypatch):
  """Refused before it reads or writes anything, by a phase and by a launcher (the
  experiments' launcher included: every one is `cli.main` around its phase)."""
  with _held(tmp_path) as holder:
    message = one_line(pipeline.run, tiny(), tmp_path)
    who = f"pid {holder.pid} on host {socket.gethostname()}"
    assert f"another run is using the workdir {tmp_path} ({who}, since" in message
    monkeypatch.setattr(sys, "argv", ["experiment.py", f"--workdir={tmp_path}", f"--config={TINY}"])
    with pytest.raises(SystemExit) as info:
      cli.main(lambda config, workdir, log: pytest.fail("ran beside another run"), TINY)
    assert str(info.value.code).startswith("robust_gate: another run is using the workdir")
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdirs.LOCK]
  lines = []
  with workdirs.lock(str(tmp_path), lines.append):  # released: free, nothing to take over
    pass
  assert lines == []


def test_the_lock_of_a_killed_run_is_taken_over_and_announced(tmp_path):
  with _held(tmp_path) as holder:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  lines = []
  with workdirs.lock(str(tmp_path), lines.append):
    assert json.loads((tmp_path / workdirs.LOCK).read_text())["pid"] == os.getpid()
  assert len(lines) == 1
  assert lines[0].startswith(f"note: took over {tmp_path / workdirs.LOCK} from pid {holder.pid}")
  assert (tmp_path / workdirs.LOCK).read_text() == ""


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
  lock = tmp_path / workdirs.LOCK
  record = {"pid": 4242, "host": "elsewhere", "started": "2025-01-01 00:00:00", "command": "x"}
  lock.write_text(json.dumps(record))
  message = one_line(pipeline.run, tiny(), tmp_path)
  assert "on another host (pid 4242 on host elsewhere, since 2025-01-01 00:00:00" in message
  assert f"delete {lock} and run again" in message
  assert json.loads(lock.read_text()) == record


def test_a_filesystem_without_locks_is_one_line(tmp_path, monkeypatch):
  def unsupported(*args):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", unsupported)
  message = one_line(pipeline.run, tiny(), tmp_path)
  assert f"cannot lock {tmp_path / workdirs.LOCK}: No locks available" in message


@pytest.mark.parametrize(
  "content", [b"\xff\xfe\x00garbage", b'{"pid": 12', b"[1, 2]"], ids=["not-utf8", "torn", "list"]
)
def test_an_unreadable_lock_record_is_refused_with_how_to_clear_it(tmp_path, content):
  """No live process here holds it, but it names no host: a run on a host whose flock
  this filesystem does not carry could, so it is not taken over blind."""
  lock = tmp_path / workdirs.LOCK
  lock.write_bytes(content)
  message = one_line(pipeline.run, tiny(), tmp_path)
  assert f"{lock} holds no readable record of the run that took this workdir" in message
  assert f"delete {lock} and run again" in message
  assert lock.read_bytes() == content


def test_process_0_tells_the_others_whatever_stopped_it(tmp_path, monkeypatch):
  """Two processes, simulated: what stops process 0 (a refusal, or a bug, which keeps its
  traceback there) reaches the others as one line, rather than leaving them waiting."""
  told = []
  monkeypatch.setattr(jax, "process_count", lambda *args: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda ok: told.append(ok) or ok)
  (tmp_path / workdirs.LOCK).write_bytes(b"\xff\xfe")
  with pytest.raises(InputError, match="holds no readable record"), workdirs.lock(str(tmp_path)):
    pytest.fail("took the lock")

  def bug(workdir, log):
    raise KeyError("a bug")

  monkeypatch.setattr(workdirs, "_acquire", bug)
  with pytest.raises(KeyError, match="a bug"), workdirs.lock(str(tmp_path)):
    pytest.fail("took the lock")
  assert [bool(ok) for ok in told] == [False, False]
  monkeypatch.setattr(jax, "process_index", lambda *args: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda ok: np.asarray(False))
  with (
    pytest.raises(InputError, match=f"process 0 could not take the lock of {tmp_path}"),
    workdirs.lock(str(tmp_path)),
  ):
    pytest.fail("went on without the lock")


def test_every_process_of_a_multi_host_job_is_refused(tmp_path):
  """Process 0 takes the lock for the job; refused, it says why and the others say
  that process 0 could not take it; none waits for the others forever."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  launcher = os.path.join(ROOT, "launch", "evaluate.py")
  with _held(tmp_path) as holder:
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          launcher,
          f"--workdir={tmp_path}",
          f"--config={TINY}",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in (0, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
  assert all(p.returncode != 0 for p in procs), errs
  assert f"robust_gate: another run is using the workdir {tmp_path} (pid {holder.pid}" in errs[0]
  assert f"robust_gate: process 0 could not take the lock of {tmp_path}" in errs[1]
  assert not any("Traceback" in e for e in errs), errs
