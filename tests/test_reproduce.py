"""launch/reproduce.sh's orchestration, with a stand-in for the launchers: what it runs,
in which workdir, how many at a time, and what it says when one fails. (The launchers
themselves are tested elsewhere; the real chains take minutes.)"""

import os
import pathlib
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
# counts the experiments running at once in $RUNNING, and writes W/experiments/E.{json,png}.
# $FAIL names an experiment that exits 1 instead.
_FAKE_PYTHON = r"""#!/usr/bin/env bash
launcher=$1; shift
for a in "$@"; do
  case $a in --experiment=*) e=${a#*=};; --workdir=*) w=${a#*=};; esac
done
if [ "$launcher" = launch/main.py ]; then mkdir -p "$w" && echo '{}' > "$w/results.json"; exit; fi
mkdir "$w/lock" 2>/dev/null || { echo "another run is using the workdir $w" >&2; exit 3; }
touch "$RUNNING/$e.$$"; ls "$RUNNING" | wc -l >> "$RUNNING.counts"; sleep 0.5
rm "$RUNNING/$e.$$"
if [ "$e" = "${FAIL:-}" ]; then rmdir "$w/lock"; exit 1; fi
mkdir -p "$w/experiments" && echo "{\"workdir\": \"$w\"}" > "$w/experiments/$e.json"
touch "$w/experiments/$e.png"; rmdir "$w/lock"
"""


def _reproduce(tmp_path, jobs: int | None, fail: str = "") -> subprocess.CompletedProcess:
  bin_dir, running = tmp_path / "bin", tmp_path / "running"
  bin_dir.mkdir()
  running.mkdir()
  fake = bin_dir / "python3"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNNING": str(running)}
  env.pop("RG_JOBS", None)
  env["FAIL"] = fail
  if jobs is not None:
    env["RG_JOBS"] = str(jobs)
  return subprocess.run(
    ["bash", str(SCRIPT), str(tmp_path / "root"), "digits"],
    capture_output=True,
    text=True,
    timeout=120,
    env=env,
  )


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


def test_a_failed_experiment_fails_the_run_by_name_and_keeps_the_others(tmp_path):
  run = _reproduce(tmp_path, 3, fail="prior")
  assert run.returncode == 1
  assert "reproduce: digits failed" in run.stderr
  assert "reproduce: digits prior failed" in (tmp_path / "root" / "digits.log").read_text()
  written = {p.stem for p in (tmp_path / "root" / "digits" / "experiments").glob("*.json")}
  assert written == set(DIGITS) - {"prior"}
  # The failed one's copy stays, for its log and files; its log is where the script says.
  assert (tmp_path / "root" / "parallel" / "digits.prior").is_dir()
  assert (tmp_path / "root" / "digits.prior.log").exists()
