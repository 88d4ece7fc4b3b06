"""End-to-end: the main job and every phase launcher on a tiny config.

Also the kill-and-resume guarantee: a run SIGKILLed at any moment and started
again with the same command ends with the same results (bitwise on CPU).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "launch", "main.py")
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
METHODS = [
  "robust_gate",
  "erm_gate",
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
ENV = {
  **os.environ,
  "JAX_COMPILATION_CACHE_DIR": os.path.join(
    os.environ.get("PYTEST_TMPDIR", "/tmp"), f"robust_gate_jax_cache_{os.getuid()}"
  ),
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _main(workdir, *overrides, launcher="main"):
  return subprocess.run(
    _command(workdir, launcher, *overrides), capture_output=True, text=True, timeout=600, env=ENV
  )


def _results(workdir):
  r = json.loads((workdir / "results.json").read_text())
  r.pop("seconds", None)  # wall-clock times differ between runs
  r.pop("provenance")  # so do the date and the command line
  return r


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  out = _main(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


def test_main_job_writes_results_plots_and_table(tiny_run):
  workdir, out = tiny_run
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
  for png in ("lambda.png", "domain_losses.png", "gate_usage.png"):
    assert (workdir / png).stat().st_size > 1000
  assert "robust_gate" in out.stdout and "worst" in out.stdout
  assert "steps/s" in out.stdout and "ETA" in out.stdout


def test_rerun_resumes_everything_and_refuses_another_config(tiny_run):
  workdir, _first = tiny_run
  stamp = os.path.getmtime(workdir / "cache_test.npz")
  before = _results(workdir)
  out = _main(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.getmtime(workdir / "cache_test.npz") == stamp  # reused, not rebuilt
  for model in (
    "experts",
    "robust_gate",
    "erm_gate",
    "student",
    "monolithic",
    "monolithic_dro",
    "monolithic_large",
  ):
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


def test_phase_launchers_one_by_one_match_the_main_job(tiny_run, tmp_path):
  out = _main(tmp_path, launcher="train_gate")  # before its inputs exist
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "experts: nothing trained" in out.stderr and "run its phase first" in out.stderr
  for phase in PHASES:
    out = _main(tmp_path, launcher=phase)
    assert out.returncode == 0, (phase, out.stderr[-3000:])
  assert _results(tmp_path) == _results(tiny_run[0])


def test_killed_at_any_moment_resumes_to_the_same_results(tiny_run, tmp_path):
  """SIGKILL mid-phase (twice: in the expert and in the gate phase), then resume."""
  for marker in ("experts/checkpoints/10", "robust_gate/checkpoints/20"):
    proc = subprocess.Popen(
      _command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.time() + 300
    while not (tmp_path / marker).exists() and proc.poll() is None:
      assert time.time() < deadline
      time.sleep(0.02)
    time.sleep(0.3)  # somewhere inside the next chunk or save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before it could be killed"
  out = _main(tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "robust_gate: resumed at step" in out.stdout
  assert _results(tmp_path) == _results(tiny_run[0])


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


def test_eight_devices_match_one(tiny_run, tmp_path):
  """Every phase data-parallel on 8 simulated CPU devices = the 1-device run."""
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run(_command(tmp_path), capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_experts: 8 cpu device(s)" in out.stdout
  _assert_same_results(_results(tiny_run[0]), _results(tmp_path))


def _two_processes(workdir, logs, env):
  """The main job as 2 processes (each with its own devices); each one's stdout and
  stderr go to logs/<id>.out, .err."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  logs.mkdir(parents=True)
  procs = []
  for i in (0, 1):  # each child keeps its own copy of the log files open
    with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
      procs.append(
        subprocess.Popen(
          _command(
            workdir,
            "main",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
          ),
          stdout=out,
          stderr=err,
          env=env,
        )
      )
  return procs


def test_two_processes_killed_and_resumed_match_one(tiny_run, tmp_path):
  """2 processes × 4 CPU devices each, both SIGKILLed in the gate phase and started
  again = the 1-device run, every number; process 0 alone writes and prints."""
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  two = tmp_path / "two"
  procs = _two_processes(two, tmp_path / "killed", env)
  deadline = time.time() + 600
  while not (two / "robust_gate" / "checkpoints" / "20").exists():
    assert all(p.poll() is None for p in procs), (tmp_path / "killed" / "0.err").read_text()
    assert time.time() < deadline
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "finished before it could be killed"
  procs = _two_processes(two, tmp_path / "resumed", env)
  for i, p in enumerate(procs):
    assert p.wait(timeout=900) == 0, (tmp_path / "resumed" / f"{i}.err").read_text()[-3000:]
  out0, out1 = ((tmp_path / "resumed" / f"{i}.out").read_text() for i in (0, 1))
  assert "train_gate: 8 cpu device(s) in 2 process(es)" in out0
  assert "robust_gate: resumed at step" in out0
  # Process 1 prints nothing of its own: gloo's C++ connection messages aside, which
  # its threads write unsynchronized (one can split another mid-line), so what must
  # be left once every word of that message is removed is nothing.
  gloo = r"\[Gloo\]|Rank|is connected to|peer ranks\.?|Expected number of connected|is :|\d+|\s"
  assert not re.sub(gloo, "", out1), out1
  _assert_same_results(_results(tiny_run[0]), _results(two))
