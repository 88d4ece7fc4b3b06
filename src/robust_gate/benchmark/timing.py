"""How a benchmark times: medians of blocked calls, device profiles, peak memory."""

import collections
import dataclasses
import glob
import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int, guard: bool = True) -> float:
  """fn() → pytree; compiled and warmed by two calls, then the median of `repeats`.

  Each call is timed to `block_until_ready`. With `guard`, under
  `jax.transfer_guard("disallow")`: a hidden host round trip inside the timed call
  would be timed too, so it is an error instead.
  """
  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    with jax.transfer_guard("disallow" if guard else "allow"):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def threaded(step: Callable[[Any], Any], state: Any) -> Callable[[], Any]:
  """A closure that advances `state` by one call of `step` each time: a step that
  donates its input can be timed repeatedly."""
  box = [state]

  def fn():
    box[0] = step(box[0])
    return box[0]

  return fn


def peak_memory_bytes() -> int | None:
  """The largest peak of device memory in use over this process's devices; None
  where the backend keeps no statistics (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  known = [p for p in peaks if p is not None]
  return int(max(known)) if known else None


@dataclasses.dataclass(frozen=True)
class Profile:
  """Device time of one call, per operation, from a `jax.profiler` trace."""

  device_seconds: float  # busy time summed over the device ops
  num_ops: int
  lines: list[str]  # the trace's device lines that were counted
  by_kind: dict[str, float]  # seconds per kind of op (matmul, attention, ...)
  ops: list[tuple[str, float, int]]  # (name, seconds, count), longest first


def device_profile(fn: Callable[[], Any]) -> Profile | None:
  """The Profile of one call of fn(); None on a backend whose trace has no device
  lines (CPU)."""
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      jax.block_until_ready(fn())
    (path,) = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  names = {
    (e["pid"], e.get("tid")): e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")
  }
  devices = {pid for (pid, tid), n in names.items() if tid is None and "/device:" in n}
  # A GPU trace shows each kernel on its stream's line and again on derived lines
  # ("XLA Ops", "XLA Modules"); count the streams only.
  lines = {k for k, n in names.items() if k[0] in devices and k[1] is not None}
  if not lines:
    return None
  streams = {k for k in lines if names[k].startswith("Stream")} or lines
  seconds: collections.Counter[str] = collections.Counter()
  count: collections.Counter[str] = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in streams:
      continue
    seconds[e["name"]] += e["dur"] * 1e-6
    count[e["name"]] += 1
  by_kind: collections.Counter[str] = collections.Counter()
  for n, t in seconds.items():
    by_kind[op_kind(n)] += t
  return Profile(
    device_seconds=sum(seconds.values()),
    num_ops=sum(count.values()),
    lines=sorted(names[k] for k in lines),
    by_kind=dict(by_kind),
    ops=[(n, t, count[n]) for n, t in seconds.most_common()],
  )


def op_kind(name: str) -> str:
  """A device op's kind by its kernel or fusion name (cuBLAS, Triton GEMM, cuDNN...)."""
  if name.startswith(("nvjet", "sm90_xmma", "cutlass", "gemm_fusion", "cublas")):
    return "matmul"
  if "sdpa" in name or "flash" in name or name.startswith("cudnn"):
    return "attention"
  if "scatter" in name:
    return "scatter"
  if name.startswith(("memcpy", "memset", "Memcpy", "Memset")):
    return "copy"
  return "elementwise and reductions"
