"""The benchmark library and launcher: every phase's keys in benchmark.json, the
serial-graph ablation's program and its bitwise comparison, the attention field, MFU
over all devices. No timing is asserted (only that it is a positive number)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import env_with_devices
from tolerances import F32_RTOL

from robust_gate import benchmark, closures, models, primal_dual
from robust_gate.benchmark import phases, records
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
  d_model=16,
  num_layers=1,
  num_heads=2,
  vocab=11,
  seq_len=8,
  batch=8,
  num_experts=3,
  per_domain=4,
  gate_per_domain=4,
  scan_steps=2,
  matmul_size=32,
  repeats=1,
)
RECORDS = {
  "matmul": records.Matmul,
  "experts": records.Experts,
  "gate": records.Gate,
  "scan": records.Scan,
  "stream": records.Stream,
  "distill": records.Distill,
  "cache": records.Cache,
  "inference": records.Inference,
}


def _keys(record_type) -> set[str]:
  return {f.name for f in dataclasses.fields(record_type)} - {"profile", "unroll_step_seconds"}


def test_launcher_writes_every_phase_on_two_devices(tmp_path):
  """The launcher on 2 simulated CPU devices at tiny sizes: benchmark.json has the
  provenance, the config and every phase's keys; MFU is over the peak of both devices
  the step is split over."""
  launcher = os.path.join(ROOT, "launch", "benchmark.py")
  flags = [f"--{k}={v}" for k, v in TINY.items()] + ["--scan_unrolls=2", "--profile"]
  env = env_with_devices(2)
  workdir = tmp_path / "bench"
  proc = subprocess.run(
    [sys.executable, launcher, f"--workdir={workdir}", *flags],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.listdir(workdir) == [benchmark.FILENAME]  # no temporary file left
  r = json.loads((workdir / benchmark.FILENAME).read_text())
  config = benchmark.BenchmarkConfig(**TINY, scan_unrolls=(2,), profile=True)
  assert (
    r["config"] == r["provenance"]["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
  )
  assert r["provenance"]["device"] == "2 × cpu" and r["provenance"]["commit"]
  assert r["xla_flags"] == env["XLA_FLAGS"] and r["profiles"] == {}  # CPU: no device trace
  m = r["measurements"]
  assert list(m) == list(benchmark.PHASES)
  for phase, record_type in RECORDS.items():
    extra = {"scan_step_seconds_unroll2", "scan_speedup_unroll2"} if phase == "scan" else set()
    assert set(m[phase]) == _keys(record_type) | extra, phase
    assert any(line.startswith(phase) for line in proc.stdout.splitlines()), phase
  for phase, key in (
    ("matmul", "tflops_per_device"),
    ("experts", "tokens_per_second"),
    ("gate", "robust_over_erm"),
    ("scan", "scan_speedup"),
    ("scan", "scan_step_seconds_unroll2"),
    ("stream", "streamed_over_resident"),
    ("stream", "disk_over_resident"),
    ("stream", "gather_step_seconds"),
    ("distill", "student_tokens_per_second"),
    ("cache", "cache_over_forward"),
    ("inference", "student_speedup"),
  ):
    assert math.isfinite(m[phase][key]) and m[phase][key] > 0, (phase, key)
  assert isinstance(m["scan"]["serial_bitwise_equal"], bool)
  assert m["stream"]["bitwise_equal"] is True  # streamed rows: the same steps, on 2 devices
  assert m["inference"]["target_speedup"] == 2.0 and m["experts"]["params_per_expert"] > 0
  e = m["experts"]
  assert e["num_devices"] == 2
  assert e["peak_tflops"] == pytest.approx(2 * m["matmul"]["tflops_per_device"])
  assert e["mfu"] == pytest.approx(e["model_tflops"] / (2 * m["matmul"]["tflops_per_device"]))


def test_run_in_process(tmp_path):
  """`run` returns what it writes; MFU divides by every device's peak."""
  lines: list[str] = []
  r = benchmark.run(
    benchmark.BenchmarkConfig(**TINY, phases=("matmul",)), str(tmp_path), lines.append
  )
  assert json.loads((tmp_path / benchmark.FILENAME).read_text()) == json.loads(json.dumps(r))
  assert list(r["measurements"]) == ["matmul"] and lines[0].startswith("matmul")
  assert benchmark.mfu(6.0, 4.0, 3) == pytest.approx(0.5)


def test_bitwise_equal_tells_apart_what_equality_does_not():
  """The serial ablation's check compares bits: −0.0 and 0.0 differ, a NaN equals
  itself, one ulp, a dtype or a tree structure apart is different."""
  x = {"w": np.array([1.0, 0.0, np.nan], np.float32), "step": np.int32(3)}
  assert phases.bitwise_equal(x, {"w": x["w"].copy(), "step": np.int32(3)})
  negative_zero = x["w"].copy()
  negative_zero[1] = -0.0
  assert np.array_equal(x["w"], negative_zero, equal_nan=True)  # == cannot tell
  assert not phases.bitwise_equal(x, {**x, "w": negative_zero})
  one_ulp = x["w"].copy()
  one_ulp[0] = np.nextafter(np.float32(1.0), np.float32(2.0))
  assert not phases.bitwise_equal(x, {**x, "w": one_ulp})
  assert not phases.bitwise_equal(x, {**x, "step": np.int64(3)})
  assert not phases.bitwise_equal(x, {"w": x["w"]})


def test_serial_ablation_is_the_same_program_run_for_the_same_steps():
  """The scan phase's ablation lowers to primal_dual.run's program exactly (only XLA's
  compile options differ, which the CPU ignores), and its state after n steps is that
  of n steps taken one at a time (an independent reference)."""
  c = benchmark.BenchmarkConfig(**TINY)
  step, state = phases._gate_start(c, 0.5)
  n = 3
  body, consts = closures.hoist(step, state, None)
  lower = lambda concurrent: primal_dual.SCANS[concurrent].lower(body, consts, state, n, None, 1)
  assert lower(False).as_text() == lower(True).as_text()
  reference = jax.tree_util.tree_map(jnp.copy, state)
  one_step = jax.jit(step)
  for _ in range(n):
    reference, _ = one_step(reference, None)
  final, metrics = phases.serial_run(step, state, n)
  assert int(final.step) == n and metrics["losses"].shape == (n, c.num_experts)
  for got, want in zip(
    jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(reference), strict=True
  ):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=F32_RTOL, atol=1e-6)


def test_attention_field():
  """On CPU "auto" is XLA's attention: the same logits as "xla"; a bad value is an
  InputError, and so is "cudnn" where cuDNN's kernel cannot run."""
  cfg = models.LMConfig(vocab_size=11, max_len=8, d_model=16, num_heads=2, d_ff=32)
  params = jax.jit(models.init_lm, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  x_BxT = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 11)
  logprobs = jax.jit(models.next_token_logprobs, static_argnums=0)
  auto = logprobs(cfg, params, x_BxT)
  xla = logprobs(dataclasses.replace(cfg, attention="xla"), params, x_BxT)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
  with pytest.raises(InputError, match="attention"):
    dataclasses.replace(cfg, attention="flash")
  with pytest.raises(InputError, match="bfloat16"):  # what cuDNN's kernel takes
    dataclasses.replace(cfg, attention="cudnn")
  with pytest.raises(InputError, match="needs a GPU"):
    logprobs(dataclasses.replace(cfg, dtype="bfloat16", attention="cudnn"), params, x_BxT)
  with pytest.raises(InputError, match="attention"):
    benchmark.BenchmarkConfig(attention="flash")
  # The saved specs of existing workdirs record the fields that existed before it.
  assert list(cfg.spec()) == [
    "vocab_size",
    "max_len",
    "d_model",
    "num_layers",
    "num_heads",
    "d_ff",
    "dtype",
  ]


@pytest.mark.parametrize(
  "bad",
  [dict(phases=("matmul", "bogus")), dict(phases=()), dict(repeats=0), dict(scan_unrolls=(0,))],
)
def test_config_rejects_bad_values(bad):
  with pytest.raises(InputError):
    benchmark.BenchmarkConfig(**bad)
