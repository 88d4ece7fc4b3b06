r"""Inference throughput: the robust gated teacher (M experts + gate) against the student.

Both compute full next-token log-distributions for the same [batch, seq_len]
tokens (the work of scoring or of one sampling step over a whole context), with
random parameters of the given architecture. Each is jitted, warmed up, then timed
over --repeats calls (block_until_ready); the median is reported. Prints a table
and writes JSON.

  python launch/benchmark.py --out=/tmp/bench.json                  # CPU, small
  python launch/benchmark.py --d_model=512 --num_layers=8 --seq_len=256 --batch=64 \
      --out=$OUT/bench.json                                          # H100
"""

import json
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import distill, models

_D = flags.DEFINE_integer("d_model", 64, "Width of each expert and of the student.")
_L = flags.DEFINE_integer("num_layers", 2, "Transformer blocks.")
_H = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_FF = flags.DEFINE_integer("d_ff", 0, "MLP width; 0 = 4·d_model.")
_V = flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
_T = flags.DEFINE_integer("seq_len", 16, "Sequence length.")
_B = flags.DEFINE_integer("batch", 512, "Sequences per call.")
_M = flags.DEFINE_integer("num_experts", 6, "Experts in the teacher.")
_R = flags.DEFINE_integer("repeats", 20, "Timed calls per model.")
_OUT = flags.DEFINE_string("out", None, "JSON output path.")


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))  # warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), float(np.min(times))


def main(argv):
  del argv
  cfg = models.LMConfig(vocab_size=_V.value, max_len=_T.value, d_model=_D.value,
                        num_layers=_L.value, num_heads=_H.value,
                        d_ff=_FF.value or 4 * _D.value)
  gate_cfg = models.GateConfig(num_experts=_M.value, vocab_size=_V.value, max_len=_T.value)
  key = jax.random.PRNGKey(0)
  experts = models.init_stacked_lm(cfg, key, _M.value)
  gate = models.init_gate(gate_cfg, key)
  student = models.init_lm(cfg, key)
  x = jax.random.randint(key, (_B.value, _T.value), 1, _V.value)
  y = jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
  mask = jnp.ones(x.shape, bool)
  teacher_fn = jax.jit(lambda e, g, x, y, m: distill.teacher_next_token_logprobs(
      cfg, e, gate_cfg, g, x, y, m))
  student_fn = jax.jit(lambda p, x: models.next_token_logprobs(cfg, p, x))
  tokens = _B.value * _T.value
  t_teacher, t_teacher_min = _time(teacher_fn, experts, gate, x, y, mask, repeats=_R.value)
  t_student, t_student_min = _time(student_fn, student, x, repeats=_R.value)
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "host": platform.processor() or platform.machine(),
      "config": {"d_model": cfg.d_model, "num_layers": cfg.num_layers, "d_ff": cfg.d_ff,
                 "vocab": cfg.vocab_size, "seq_len": _T.value, "batch": _B.value,
                 "num_experts": _M.value, "repeats": _R.value, "dtype": "float32"},
      "teacher": {"seconds_median": t_teacher, "seconds_min": t_teacher_min,
                  "tokens_per_s": tokens / t_teacher},
      "student": {"seconds_median": t_student, "seconds_min": t_student_min,
                  "tokens_per_s": tokens / t_student},
      "speedup": t_teacher / t_student,
      "target_speedup": (_M.value + 1) / 2,
  }
  print(f"{'model':10s}{'median s':>12s}{'tokens/s':>14s}")
  for name in ("teacher", "student"):
    r = result[name]
    print(f"{name:10s}{r['seconds_median']:12.5f}{r['tokens_per_s']:14.0f}")
  print(f"speedup {result['speedup']:.2f}× (target ≥ {result['target_speedup']:.1f}×) on "
        f"{result['device']}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
