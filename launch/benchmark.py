r"""Benchmarks of every phase (robust_gate.benchmark): a table, and <workdir>/benchmark.json.

  python launch/benchmark.py --workdir=/tmp/bench                       # CPU, main-job sizes
  python launch/benchmark.py --workdir=/tmp/bench_h100 --d_model=512 --num_layers=8 \
      --num_heads=8 --seq_len=256 --dtype=bfloat16 --phases=matmul,experts    # H100

--phases picks among matmul, experts, gate, scan, stream, distill, cache, inference (run in
the order given; the experts phase reports MFU when matmul runs before it). The JSON
holds the provenance (commit, device, date, command), the config and each phase's
measurements under documented keys (robust_gate/benchmark/records.py).
"""

import sys

from absl import app, flags

from robust_gate import benchmark, models
from robust_gate.checks import InputError

_D = benchmark.BenchmarkConfig()  # the defaults
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Output directory: benchmark.json is written there.", required=True
)
_PHASES = flags.DEFINE_list("phases", ",".join(_D.phases), "Which benchmarks to run, in order.")
_D_MODEL = flags.DEFINE_integer("d_model", _D.d_model, "Width of each expert and the student.")
_LAYERS = flags.DEFINE_integer("num_layers", _D.num_layers, "Transformer blocks.")
_HEADS = flags.DEFINE_integer("num_heads", _D.num_heads, "Attention heads.")
_D_FF = flags.DEFINE_integer("d_ff", _D.d_ff, "MLP width; 0 = 4·d_model.")
_VOCAB = flags.DEFINE_integer("vocab", _D.vocab, "Vocabulary size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", _D.seq_len, "Sequence length.")
_EXPERTS = flags.DEFINE_integer("num_experts", _D.num_experts, "Experts (= domains).")
_DTYPE = flags.DEFINE_enum("dtype", _D.dtype, models.DTYPES, "Transformer compute dtype.")
_ATTENTION = flags.DEFINE_enum(
  "attention",
  _D.attention,
  models.ATTENTION,
  "Attention kernel: auto (cuDNN flash attention on GPU in bfloat16, XLA otherwise), xla, cudnn.",
)
_PER_DOMAIN = flags.DEFINE_integer(
  "per_domain", _D.per_domain, "Expert training and distillation: sequences per expert per step."
)
_GATE_PER_DOMAIN = flags.DEFINE_integer(
  "gate_per_domain", _D.gate_per_domain, "Gate steps: cached sequences per domain."
)
_GATE_EMA = flags.DEFINE_float(
  "gate_ema_decay", _D.gate_ema_decay, "EMA decay of the benchmarked gates."
)
_BATCH = flags.DEFINE_integer("batch", _D.batch, "Inference and scoring: sequences per call.")
_SCAN_STEPS = flags.DEFINE_integer(
  "scan_steps", _D.scan_steps, "Training steps per timed lax.scan call."
)
_UNROLLS = flags.DEFINE_list("scan_unrolls", [], "lax.scan unroll values to time besides 1.")
_MATMUL = flags.DEFINE_integer("matmul_size", _D.matmul_size, "n of the n×n×n peak matmul.")
_REPEATS = flags.DEFINE_integer("repeats", _D.repeats, "Timed calls per measurement (median).")
_PROFILE = flags.DEFINE_bool(
  "profile", _D.profile, "Add each experts/scan call's device time per operation (GPU)."
)


def _config() -> benchmark.BenchmarkConfig:
  """The flags, read once."""
  try:
    unrolls = tuple(int(u) for u in _UNROLLS.value)
  except ValueError as e:
    raise InputError(f"--scan_unrolls must be integers, got {_UNROLLS.value}.") from e
  return benchmark.BenchmarkConfig(
    phases=tuple(_PHASES.value),
    d_model=_D_MODEL.value,
    num_layers=_LAYERS.value,
    num_heads=_HEADS.value,
    d_ff=_D_FF.value,
    vocab=_VOCAB.value,
    seq_len=_SEQ_LEN.value,
    num_experts=_EXPERTS.value,
    dtype=_DTYPE.value,
    attention=_ATTENTION.value,
    per_domain=_PER_DOMAIN.value,
    gate_per_domain=_GATE_PER_DOMAIN.value,
    gate_ema_decay=_GATE_EMA.value,
    batch=_BATCH.value,
    scan_steps=_SCAN_STEPS.value,
    scan_unrolls=unrolls,
    matmul_size=_MATMUL.value,
    repeats=_REPEATS.value,
    profile=_PROFILE.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    benchmark.run(_config(), _WORKDIR.value, log=lambda s: print(s, flush=True))
  except InputError as e:
    sys.exit(f"robust_gate: {e}")


if __name__ == "__main__":
  app.run(main)
