"""launch/reproduce.sh's orchestration, with a stand-in for the launchers: what it runs,
in which workdir, how many at a time, and what it says when one fails. (The launchers
themselves are tested elsewhere; the real chains take minutes.)"""

import os
import pathlib
import signal
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "reproduce.sh"
# The experiments reproduce.sh runs on digits: the shared ones and sequence_gate.
DIGITS = (
  "convergence",
  "ema",
  "prune",
  "mixtures",
  "prior",
  "gate_size",
  "extend",
  "conflict",
  "sequence_gate",
)

# A stand-in for `python3 launch/{main,experiment}.py --experiment=E --workdir=W`: the main
# job makes W; an experiment refuses a workdir another run holds (as workdirs.lock does),
# looks 10 times, $STEP seconds apart, at how many experiments run ($RUNNING) and writes
# the most it saw to $RUNNING.counts, then writes W/experiments/E.{json,png}. An
# experiment named in $FAIL exits 1 instead. Every call's arguments go to $RUNNING.args.
_FAKE_PYTHON = r"""#!/usr/bin/env bash
launcher=$1; shift
for a in "$@"; do
  case $a in --experiment=*) e=${a#*=};; --workdir=*) w=${a#*=};; esac
done
echo "$launcher $*" >> "$RUNNING.args"
if [ "$launcher" = launch/main.py ]; then mkdir -p "$w" && echo '{}' > "$w/results.json"; exit; fi
mkdir "$w/lock" 2>/dev/null || { echo "another run is using the workdir $w" >&2; exit 3; }
touch "$RUNNING/$e.$$"; most=0
for _ in 1 2 3 4 5 6 7 8 9 10; do
  n=$(ls "$RUNNING" | wc -l); [ "$n" -gt "$most" ] && most=$n; sleep "$STEP"
done
echo "$most" >> "$RUNNING.counts"; rm "$RUNNING/$e.$$"
case " $FAIL " in *" $e "*) rmdir "$w/lock"; exit 1;; esac
mkdir -p "$w/experiments" && echo "{\"workdir\": \"$w\"}" > "$w/experiments/$e.json"
touch "$w/experiments/$e.png"; rmdir "$w/lock"
"""


def _reproduce(tmp_path, jobs, fail: str = "", config="digits") -> subprocess.CompletedProcess:
  bin_dir, running = tmp_path / "bin", tmp_path / "running"
  bin_dir.mkdir()
  running.mkdir()
  fake = bin_dir / "python3"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNNING": str(running)}
  env.pop("RG_JOBS", None)
  env["FAIL"] = fail
  # Side by side, a second of looking: the pool's last start is well inside it.
  env["STEP"] = "0.1" if jobs not in (None, 1) else "0.01"
  if jobs is not None:
    env["RG_JOBS"] = str(jobs)
  # A session of its own, killed whole on a timeout: a broken pool must not leave its
  # background chain running after the test.
  with subprocess.Popen(
    ["bash", str(SCRIPT), str(tmp_path / "root"), config],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    start_new_session=True,
  ) as p:
    try:
      out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      raise
  return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _counts(tmp_path) -> list[int]:
  return [int(n) for n in (tmp_path / "running.counts").read_text().split()]


@pytest.mark.parametrize("jobs", [None, 3])
def test_every_experiment_lands_in_the_main_workdir_at_most_jobs_at_a_time(tmp_path, jobs):
  run = _reproduce(tmp_path, jobs)
  assert run.returncode == 0, (run.stdout, run.stderr, (tmp_path / "root/digits.log").read_text())
  workdir = tmp_path / "root" / "digits"
  written = sorted(p.name for p in (workdir / "experiments").iterdir())
  assert written == sorted(f"{e}.{x}" for e in DIGITS for x in ("json", "png"))
  counts = _counts(tmp_path)
  assert len(counts) == len(DIGITS)
  assert max(counts) == (jobs or 1), counts  # never more than asked; the pool is filled
  # Side by side, each ran in its own copy (the lock refuses two in one), now removed.
  copies = tmp_path / "root" / "parallel"
  if (jobs or 1) > 1:
    assert (workdir / "experiments" / "ema.json").read_text().count("parallel/digits.ema")
    assert not list(copies.iterdir())
  else:
    assert not copies.exists()


def test_failed_experiments_fail_the_run_by_name_and_keep_the_others(tmp_path):
  run = _reproduce(tmp_path, 3, fail="prior conflict")
  assert run.returncode == 1
  assert "reproduce: digits failed" in run.stderr
  log = (tmp_path / "root" / "digits.log").read_text()
  assert "reproduce: digits prior failed" in log and "reproduce: digits conflict failed" in log
  written = {p.stem for p in (tmp_path / "root" / "digits" / "experiments").glob("*.json")}
  assert written == set(DIGITS) - {"prior", "conflict"}
  # A failed one's copy stays, for its files; its log is where the script says.
  assert (tmp_path / "root" / "parallel" / "digits.prior").is_dir()
  assert (tmp_path / "root" / "digits.prior.log").exists()


@pytest.mark.parametrize("jobs", ["0", "abc", "-2", "2.5"])
def test_rg_jobs_that_is_not_a_positive_integer_is_one_clear_line(tmp_path, jobs):
  run = _reproduce(tmp_path, jobs)
  assert run.returncode == 2
  assert run.stderr.strip() == f"reproduce: RG_JOBS must be a positive integer, got '{jobs}'"
  assert not (tmp_path / "root").exists()  # nothing started


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_experiments_settings_for_a_config_reach_its_launcher_and_no_other(tmp_path, jobs):
  """source_h200's student_size gets half the batch for twice the steps (its 4× student
  fits one H200 then); student_seeds on it, and the main job, get no settings."""
  done = _reproduce(tmp_path, jobs, config="source_h200")
  assert done.returncode == 0, done.stderr
  calls = (tmp_path / "running.args").read_text().splitlines()
  with_settings = [c for c in calls if "--setting=" in c]
  assert len(with_settings) == 1, calls
  assert "--experiment=student_size " in with_settings[0]
  assert "--setting=per_domain=64 --setting=steps=1000" in with_settings[0]
  assert any("--experiment=student_seeds" in c for c in calls)
