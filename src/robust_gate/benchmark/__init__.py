"""Benchmarks of every phase of the job: step time, tokens/s, peak memory, MFU.

    config = BenchmarkConfig(d_model=512, num_layers=8, dtype="bfloat16")
    result = run(config, workdir)    # also writes <workdir>/benchmark.json

Phases (`config.phases`, run in the order given):
  matmul     the measured matmul peak of one device in the compute dtype: the MFU
             denominator (times the number of devices a step is split over)
  experts    expert training: M stacked experts, forward + backward + Adam; MFU
  gate       the primal-dual gate step against the ERM gate step
  scan       lax.scan against one jitted step per Python iteration, and against
             itself compiled without primal_dual.COMPILER_OPTIONS (bitwise equal)
  stream     the gate's training loop with its rows streamed by the host (from
             memory, from disk shards) against drawn inside jit (bitwise equal)
  distill    one distillation step (teacher on the fly, student trained)
  cache      experts.build_cache against one forward pass of the M experts
  inference  teacher (M experts + gate) against the student

Every measurement compiles and warms up first, then times `repeats` calls and
reports the median (`timing.median_seconds`). `records` names and documents every
key of the JSON.
"""

from robust_gate.benchmark.config import PHASES, BenchmarkConfig
from robust_gate.benchmark.phases import mfu, model_flops_per_token
from robust_gate.benchmark.runner import FILENAME, run

__all__ = ["FILENAME", "PHASES", "BenchmarkConfig", "mfu", "model_flops_per_token", "run"]
