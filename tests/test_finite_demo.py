import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "launch", "finite_demo.py")


def _run(workdir, *overrides):
  return subprocess.run(
    [sys.executable, MAIN, f"--workdir={workdir}", *overrides],
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize("lam_set", ["simplex", "box", "kl_ball"])
def test_finite_demo_end_to_end(tmp_path, lam_set):
  out = _run(
    tmp_path, "--config.steps=1500", "--config.num_points=12", f"--config.uncertainty={lam_set}"
  )
  assert out.returncode == 0, out.stderr
  assert "worst case over Λ" in out.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["uncertainty"] == lam_set
  assert abs(results["game"]["model_mass"] - 1.0) < 1e-6
  assert -1e-4 <= results["relative_gap"] <= 0.01


def test_finite_demo_bad_config_is_a_clear_error(tmp_path):
  out = _run(tmp_path, "--config.uncertainty=ellipsoid")
  assert out.returncode != 0
  assert "unknown config.uncertainty 'ellipsoid'" in out.stderr
  out = _run(tmp_path, "--config.no_such_field=1")
  assert out.returncode != 0 and "no_such_field" in out.stderr
  out = _run(tmp_path, "--config.box_lo=0.5", "--config.uncertainty=box")
  assert out.returncode != 0 and "robust_gate: box admits no mixture" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "results.json").exists()
