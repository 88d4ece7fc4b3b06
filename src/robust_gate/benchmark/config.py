"""What a benchmark run measures and at which sizes: one frozen, validated record."""

import dataclasses

from robust_gate import models
from robust_gate.checks import InputError

# In the order `run` prints them; any subset, in any order, may be asked for.
PHASES = ("matmul", "experts", "gate", "scan", "stream", "distill", "cache", "inference")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """Sizes and settings of every phase (the defaults are the main job's sizes)."""

  phases: tuple[str, ...] = PHASES
  d_model: int = 64  # width of each expert and of the student
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 0  # MLP width; 0 = 4·d_model
  vocab: int = 256
  seq_len: int = 16
  num_experts: int = 6  # M experts = K domains
  dtype: str = "float32"  # transformer compute dtype (models.DTYPES)
  attention: str = "auto"  # attention kernel (models.ATTENTION)
  per_domain: int = 32  # expert training and distillation: sequences per expert per step
  gate_per_domain: int = 64  # gate steps: cached sequences per domain
  gate_ema_decay: float = 0.99  # EMA decay of the benchmarked gates (config.gate.ema_decay)
  batch: int = 512  # inference and scoring: sequences per call
  scan_steps: int = 20  # training steps per timed lax.scan call
  scan_unrolls: tuple[int, ...] = ()  # lax.scan unroll values timed besides 1
  matmul_size: int = 1024  # n of the n×n×n peak matmul
  repeats: int = 10  # timed calls per measurement (the median is reported)
  profile: bool = False  # add a per-operation device profile to experts and scan

  def __post_init__(self):
    unknown = [p for p in self.phases if p not in PHASES]
    if unknown or not self.phases:
      raise InputError(f"phases must be a non-empty subset of {PHASES}, got {self.phases}.")
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.type is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise InputError(f"BenchmarkConfig.{f.name} must be a non-negative int, got {v!r}.")
      if f.type is int and v == 0 and f.name != "d_ff":
        raise InputError(f"BenchmarkConfig.{f.name} must be positive, got 0.")
    if self.seq_len < 2 or self.vocab < 2:
      raise InputError("seq_len and vocab must be at least 2 (a token and EOS).")
    if any(isinstance(u, bool) or not isinstance(u, int) or u < 1 for u in self.scan_unrolls):
      raise InputError(f"scan_unrolls must be positive ints, got {self.scan_unrolls}.")
    if not 0.0 <= self.gate_ema_decay < 1.0:
      raise InputError(f"gate_ema_decay must be in [0, 1), got {self.gate_ema_decay}.")
    self.lm_config()  # dtype, attention, d_model vs num_heads: LMConfig's own checks

  def lm_config(self) -> models.LMConfig:
    """Every expert's and the student's architecture."""
    return models.LMConfig(
      vocab_size=self.vocab,
      max_len=self.seq_len,
      d_model=self.d_model,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      d_ff=self.d_ff or 4 * self.d_model,
      dtype=self.dtype,
      attention=self.attention,
    )

  def gate_config(self) -> models.GateConfig:
    return models.GateConfig(
      num_experts=self.num_experts, vocab_size=self.vocab, max_len=self.seq_len
    )
