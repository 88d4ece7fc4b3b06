"""The benchmark launcher runs and writes its JSON (no timing is asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--d_model=16",
       "--num_layers=1", "--num_heads=2", "--vocab=11", "--seq_len=8", "--batch=4",
       "--num_experts=3", "--repeats=2", f"--out={out}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r["teacher"]["tokens_per_s"] > 0 and r["student"]["tokens_per_s"] > 0
  assert r["target_speedup"] == 2.0 and r["config"]["num_experts"] == 3
  assert "speedup" in proc.stdout
