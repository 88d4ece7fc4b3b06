"""What each phase measures: one frozen record per phase, its fields the JSON keys.

Units are in the names: `_seconds` (wall time, the median of `repeats` calls),
`_per_second`, `_tflops` (10¹² FLOP/s), `_bytes`; a ratio is named `a_over_b`, a
speedup says which way (a time ratio, > 1 is faster). `to_dict()` is flat: numbers,
bools and None only; a device profile is kept apart (`profile`, not in `to_dict()`).
"""

import dataclasses
from typing import Any

from robust_gate.benchmark.timing import Profile


@dataclasses.dataclass(frozen=True)
class _Record:
  def to_dict(self) -> dict[str, Any]:
    """The flat measurements of the phase (without any profile)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "profile"}


@dataclasses.dataclass(frozen=True)
class Matmul(_Record):
  """The MFU denominator: n×n×n products in the compute dtype on one device."""

  size: int  # n
  matmul_seconds: float  # one product
  tflops_per_device: float  # 2n³ / matmul_seconds


@dataclasses.dataclass(frozen=True)
class Experts(_Record):
  """Expert training: M stacked experts, one step = forward + backward + Adam on
  per_domain sequences per expert, data-parallel over every device."""

  step_seconds: float
  tokens_per_second: float  # M · per_domain · seq_len per step, over all devices
  model_flops_per_step: float  # phases.model_flops_per_token · tokens per step
  model_tflops: float  # achieved, over all devices
  params_per_expert: int
  num_devices: int  # devices the step is split over
  peak_tflops: float | None  # num_devices · Matmul.tflops_per_device; None without matmul
  mfu: float | None  # model_tflops / peak_tflops
  peak_memory_bytes: int | None  # the largest over the devices; None on CPU
  profile: Profile | None = None


@dataclasses.dataclass(frozen=True)
class Gate(_Record):
  """The robust gate's primal-dual step against the ERM gate's (same gate, batch)."""

  robust_step_seconds: float
  erm_step_seconds: float
  robust_over_erm: float  # the cost of the dual player


@dataclasses.dataclass(frozen=True)
class Scan(_Record):
  """The robust gate's steps in one lax.scan against one jitted call per step."""

  scan_step_seconds: float  # primal_dual.run, unroll 1
  loop_step_seconds: float  # the same step dispatched from a Python loop
  scan_speedup: float  # loop_step_seconds / scan_step_seconds
  # Ablation: the scan compiled without primal_dual.COMPILER_OPTIONS (the GPU runs
  # the graph's kernels one after another); bitwise equal results are expected.
  serial_scan_step_seconds: float
  serial_bitwise_equal: bool
  unroll_step_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
  profile: Profile | None = None

  def to_dict(self) -> dict[str, Any]:
    """Unrolled times flat: `scan_step_seconds_unroll<u>` and `scan_speedup_unroll<u>`."""
    out = super().to_dict()
    for u, t in out.pop("unroll_step_seconds").items():
      out[f"scan_step_seconds_unroll{u}"] = t
      out[f"scan_speedup_unroll{u}"] = self.loop_step_seconds / t
    return out


@dataclasses.dataclass(frozen=True)
class Stream(_Record):
  """The robust gate's training loop (train.fit in chunks of scan_steps) with its
  minibatches drawn inside jit from a cache on the devices (resident), against the same
  steps streamed: each chunk's rows gathered by the host, from memory or from disk
  shards through memory maps, the next chunk's while one runs (robust_gate.streaming)."""

  resident_step_seconds: float
  streamed_step_seconds: float  # rows gathered from host memory
  disk_step_seconds: float  # rows read from disk shards (the page cache warm)
  streamed_over_resident: float  # > 1: streaming costs that factor
  disk_over_resident: float
  gather_step_seconds: float  # the host gathering one step's rows, alone (hidden if < a step)
  bitwise_equal: bool  # both streamed loops end in the resident loop's state


@dataclasses.dataclass(frozen=True)
class Distill(_Record):
  """One distillation step: the teacher (M experts + gate) on the fly, the student's
  forward + backward + Adam."""

  step_seconds: float
  student_tokens_per_second: float
  peak_memory_bytes: int | None


@dataclasses.dataclass(frozen=True)
class Cache(_Record):
  """Scoring every expert over a dataset (experts.build_cache, host transfers
  included) against one forward pass of the M experts as one batched program."""

  cache_tokens_per_second: float
  forward_tokens_per_second: float
  cache_over_forward: float


@dataclasses.dataclass(frozen=True)
class Inference(_Record):
  """Full next-token distributions at equal batch and length: the teacher (M
  experts + gate) against the distilled student."""

  teacher_tokens_per_second: float
  student_tokens_per_second: float
  student_speedup: float  # teacher time / student time
  target_speedup: float  # (M + 1) / 2, the speedup the project asks of the student


Record = Matmul | Experts | Gate | Scan | Stream | Distill | Cache | Inference
