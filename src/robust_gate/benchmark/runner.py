"""`run`: the chosen phases in order, a printed table, `<workdir>/benchmark.json`."""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from robust_gate import files, parallel, provenance
from robust_gate.benchmark import phases, records
from robust_gate.benchmark.config import BenchmarkConfig
from robust_gate.benchmark.timing import Profile
from robust_gate.checks import InputError

FILENAME = "benchmark.json"

_PHASE_FNS: dict[str, Callable[[BenchmarkConfig], records.Record]] = {
  "matmul": phases.matmul,
  "gate": phases.gate,
  "scan": phases.scan,
  "stream": phases.stream,
  "distill": phases.distillation,
  "cache": phases.cache,
  "inference": phases.inference,
}


def run(config: BenchmarkConfig, workdir: str, log: Callable[[str], None] = print) -> dict:
  """Runs `config.phases` in order; writes and returns the benchmark JSON.

  The experts phase reports MFU when the matmul phase ran before it. The JSON:
  {"provenance", "config", "xla_flags", "measurements": {phase: flat record},
  "profiles": {phase: Profile} (with config.profile, on a backend that traces
  devices)}; `records` documents every measurement.
  """
  try:
    if parallel.is_main():
      os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot use --workdir={workdir!r}: {e.strerror}.") from e
  result: dict[str, Any] = {
    "provenance": provenance.collect(config).to_dict(),
    "config": dataclasses.asdict(config),
    # The environment's XLA options change the compiled programs: kept with the numbers.
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "measurements": {},
    "profiles": {},
  }
  tflops_per_device = None
  for name in config.phases:
    if name == "experts":
      record: records.Record = phases.experts_training(config, tflops_per_device)
    else:
      record = _PHASE_FNS[name](config)
    if isinstance(record, records.Matmul):
      tflops_per_device = record.tflops_per_device
    result["measurements"][name] = record.to_dict()
    log(_row(name, result["measurements"][name]))
    profile = getattr(record, "profile", None)
    if profile is not None:
      result["profiles"][name] = dataclasses.asdict(profile)
      for line in _profile_lines(profile):
        log(line)
  files.write_json(os.path.join(workdir, FILENAME), result)
  return result


def _row(name: str, measurements: dict) -> str:
  cells = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in measurements.items())
  return f"{name:10s} " + "  ".join(cells)


def _profile_lines(p: Profile) -> list[str]:
  lines = [f"{'':10s} one call: {p.num_ops} device ops, {p.device_seconds * 1e3:.3f} ms busy"]
  lines.append(f"{'':12s}" + "  ".join(f"{k} {t * 1e3:.3f} ms" for k, t in p.by_kind.items()))
  lines += [f"{'':12s}{t * 1e3:9.3f} ms {c:6d}×  {n[:90]}" for n, t, c in p.ops[:12]]
  return lines
