"""The benchmark launcher runs every phase and writes its JSON (no timing is asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "benchmark.py"),
      "--d_model=16",
      "--num_layers=1",
      "--num_heads=2",
      "--vocab=11",
      "--seq_len=8",
      "--batch=8",
      "--num_experts=3",
      "--per_domain=4",
      "--gate_per_domain=4",
      "--scan_steps=3",
      "--matmul_size=64",
      "--repeats=2",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r["inference"]["teacher_tokens_per_s"] > 0
  assert r["inference"]["target_speedup"] == 2.0 and r["config"]["num_experts"] == 3
  assert r["experts"]["mfu"] > 0 and r["experts"]["params_per_expert"] > 0
  for phase, key in (("gate", "ratio"), ("scan", "speedup"), ("cache", "ratio")):
    assert r[phase][key] > 0
  assert r["distill"]["student_tokens_per_s"] > 0
  assert r["scan"]["serial_bitwise_equal"] is True
  for phase in ("matmul", "experts", "gate", "scan", "distill", "cache", "inference"):
    assert phase in proc.stdout
