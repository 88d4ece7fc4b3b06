"""End-to-end: the main job on a tiny config, through its absl launcher."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "launch", "main.py")
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
METHODS = ["robust_gate", "erm_gate", "uniform_mixture", "posterior_gate", "monolithic",
           "monolithic_large", "monolithic_dro", "student"]


def _main(workdir, *overrides):
  return subprocess.run([sys.executable, MAIN, f"--workdir={workdir}", f"--config={TINY}",
                         *overrides], capture_output=True, text=True, timeout=600)


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
  for png in ("lambda.png", "domain_losses.png", "gate_usage.png"):
    assert (workdir / png).stat().st_size > 1000
  assert "robust_gate" in out.stdout and "worst" in out.stdout
  assert "steps/s" in out.stdout and "ETA" in out.stdout


def test_rerun_reuses_the_caches_and_refuses_other_data(tiny_run):
  workdir, _ = tiny_run
  stamp = os.path.getmtime(workdir / "cache_test.npz")
  out = _main(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.getmtime(workdir / "cache_test.npz") == stamp  # reused, not rebuilt
  before = json.loads((workdir / "results.json").read_text())
  out = _main(workdir, "--config.data.options.examples_per_split=(60,40,41)")
  assert out.returncode != 0
  assert "built for other data or other experts" in out.stderr
  assert "Traceback" not in out.stderr
  assert json.loads((workdir / "results.json").read_text()) == before  # nothing lost


def test_bad_config_is_a_clear_error(tmp_path):
  out = _main(tmp_path, "--config.baseline=oracle")
  assert out.returncode != 0 and "unknown config.baseline 'oracle'" in out.stderr
  out = _main(tmp_path, "--config.data.options.num_domains=0")
  assert out.returncode != 0 and "Traceback" not in out.stderr
