r"""Benchmarks of every phase: tokens/s, step time, peak device memory, MFU; JSON + table.

Phases (--phases, comma-separated):
  matmul     the measured bf16 (or --dtype) matmul peak: the MFU denominator
  experts    expert training: K stacked experts, one step = forward + backward + Adam
             on per_domain sequences per expert; model FLOPs utilization (MFU)
  gate       the primal-dual gate step against the ERM gate step (same gate, batch)
  scan       the lax.scan loop against one jitted step per Python iteration (and
             against itself compiled without primal_dual.COMPILER_OPTIONS)
  distill    one distillation step (teacher: M experts + gate, on the fly; student
             forward + backward + Adam)
  cache      scoring all experts over a dataset (experts.build_cache) against one
             forward pass of the M experts as one batched program
  inference  teacher (M experts + gate) against the student, full next-token
             distributions at equal batch and sequence length

Every measurement compiles and warms up first, then times --repeats calls with
block_until_ready under jax.transfer_guard("disallow") (no hidden host round trips
inside the timed loop) and reports the median. Data is random tokens (throughput
does not depend on the text). --profile adds, for the experts and scan phases, the
device time of one call per operation (from a jax.profiler trace): where the time goes.

  python launch/benchmark.py --out=/tmp/bench.json                        # CPU, small
  python launch/benchmark.py --d_model=512 --num_layers=8 --num_heads=8 --seq_len=256 \
      --dtype=bfloat16 --out=$OUT/bench.json                              # H100
"""

import collections
import glob
import gzip
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from robust_gate import data, distill, experts, models, primal_dual, train

_PHASES = flags.DEFINE_list(
  "phases", "matmul,experts,gate,scan,distill,cache,inference", "Which benchmarks to run."
)
_D = flags.DEFINE_integer("d_model", 64, "Width of each expert and of the student.")
_L = flags.DEFINE_integer("num_layers", 2, "Transformer blocks.")
_H = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_FF = flags.DEFINE_integer("d_ff", 0, "MLP width; 0 = 4·d_model.")
_V = flags.DEFINE_integer("vocab", 256, "Vocabulary size.")
_T = flags.DEFINE_integer("seq_len", 16, "Sequence length.")
_M = flags.DEFINE_integer("num_experts", 6, "Experts (= domains).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", models.DTYPES, "Transformer compute dtype.")
_PER_DOMAIN = flags.DEFINE_integer(
  "per_domain", 32, "Expert training: sequences per expert per step."
)
_GATE_PER_DOMAIN = flags.DEFINE_integer(
  "gate_per_domain", 64, "Gate steps: cached sequences per domain."
)
_GATE_EMA = flags.DEFINE_float(
  "gate_ema_decay", 0.99, "EMA decay of the benchmarked gates (config.gate.ema_decay)."
)
_B = flags.DEFINE_integer("batch", 512, "Inference and scoring: sequences per call.")
_SCAN = flags.DEFINE_integer("scan_steps", 20, "Training steps per timed lax.scan call.")
_UNROLL = flags.DEFINE_list("scan_unroll", "1", "lax.scan unroll values to time.")
_MATMUL = flags.DEFINE_integer("matmul_size", 1024, "n of the n×n×n peak matmul.")
_R = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median).")
_XLA_ATTENTION = flags.DEFINE_bool(
  "xla_attention", False, "Ablation: force XLA's attention instead of cuDNN's on GPU."
)
_PROFILE = flags.DEFINE_bool(
  "profile", False, "Add each experts/scan call's device time per operation."
)
_OUT = flags.DEFINE_string("out", None, "JSON output path.")


def _median_time(fn, repeats, guard=True):
  """fn() → pytree; compile + warm, then the median of `repeats` timed calls."""
  jax.block_until_ready(fn())
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    with jax.transfer_guard("disallow" if guard else "allow"):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def _device_ops(fn):
  """Device time of one call of fn() per operation name, from a profiler trace.

  Returns {"device_seconds": busy time summed over device ops, "num_ops": count,
  "lines": the trace's device lines, "by_kind": seconds per kind of op, "ops":
  [[name, seconds, count], ...] longest first}; empty on a backend whose trace has
  no device lines (CPU).
  """
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
  streams = {k for k in lines if names[k].startswith("Stream")} or lines
  seconds, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in streams:
      continue
    seconds[e["name"]] += e["dur"] * 1e-6
    count[e["name"]] += 1
  by_kind = collections.Counter()
  for n, t in seconds.items():
    by_kind[_op_kind(n)] += t
  return {
    "device_seconds": sum(seconds.values()),
    "num_ops": sum(count.values()),
    "lines": sorted(names[k] for k in lines),
    "by_kind": dict(by_kind),
    "ops": [[n, t, count[n]] for n, t in seconds.most_common()],
  }


def _op_kind(name):
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


def _threaded(step, state):
  """A closure that advances `state` (donated) by one call of `step` each time."""
  box = [state]

  def fn():
    box[0] = step(box[0])
    return box[0]

  return fn


def _peak_memory():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _lm_config():
  return models.LMConfig(
    vocab_size=_V.value,
    max_len=_T.value,
    d_model=_D.value,
    num_layers=_L.value,
    num_heads=_H.value,
    d_ff=_FF.value or 4 * _D.value,
    dtype=_DTYPE.value,
  )


def _random_data(num_per_domain):
  """Random full-length token sequences (T−1 tokens + EOS), M domains."""
  rng = np.random.default_rng(0)
  n = num_per_domain * _M.value
  seqs = list(rng.integers(1, _V.value, size=(n, _T.value - 1)))
  return data.encode(
    seqs,
    np.arange(n) % _M.value,
    [f"d{k}" for k in range(_M.value)],
    vocab_size=_V.value,
    max_len=_T.value,
  )


def model_flops_per_token(cfg: models.LMConfig) -> float:
  """Training FLOPs per token of one model: 6·(dense params) + 12·L·T·d attention."""
  d, f, L = cfg.d_model, cfg.d_ff, cfg.num_layers
  dense = L * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
  return 6.0 * dense + 12.0 * L * cfg.max_len * d


def bench_matmul():
  """n×n×n products on random data, 10 dispatched back to back per timed call (one
  product per call would also time the host's launch and wait)."""
  n, dt = _MATMUL.value, jnp.dtype(_DTYPE.value)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
  bs = [jax.random.normal(jax.random.PRNGKey(k), (n, n), dt) for k in range(1, 3)]
  f = jax.jit(lambda a, b: a @ b)
  t = _median_time(lambda: [f(a, bs[k % 2]) for k in range(10)], _R.value) / 10
  return {"n": n, "seconds": t, "flops_per_s": 2.0 * n**3 / t}


def bench_experts(peak):
  cfg = _lm_config()
  d = _random_data(max(2 * _PER_DOMAIN.value, 8))
  step, state = train.make_game(
    train.expert_loss_fn(cfg, d, _PER_DOMAIN.value),
    models.init_stacked_lm(cfg, jax.random.PRNGKey(0), _M.value),
    num_domains=_M.value,
    lr=1e-3,
    dual_lr=0.0,
    seed=0,
  )
  n = _SCAN.value
  call = _threaded(lambda s, step=step: primal_dual.run(step, s, n)[0], state)
  t = _median_time(call, _R.value)
  tokens = _M.value * _PER_DOMAIN.value * _T.value
  flops = model_flops_per_token(cfg) * tokens
  params = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)) // _M.value
  out = {
    "step_seconds": t / n,
    "tokens_per_s": tokens * n / t,
    "model_flops_per_step": flops,
    "model_flops_per_s": flops * n / t,
    "params_per_expert": int(params),
    "peak_bytes": _peak_memory(),
  }
  if peak:
    out["mfu"] = out["model_flops_per_s"] / peak
  if _PROFILE.value:
    out["profile"] = _device_ops(call)
  return out


def _gate_game(dual_lr):
  gate_cfg = models.GateConfig(num_experts=_M.value, vocab_size=_V.value, max_len=_T.value)
  d = _random_data(max(2 * _GATE_PER_DOMAIN.value, 8))
  cache = np.asarray(
    jax.nn.log_softmax(jax.random.normal(jax.random.PRNGKey(0), (*d.inputs_NxT.shape, _M.value, 4)))
  )[..., 0]
  cache = np.where(d.mask_NxT[..., None], cache, 0.0).astype(np.float32)
  loss = train.gate_loss_fn(gate_cfg, d, cache, _GATE_PER_DOMAIN.value, jnp.zeros(_M.value))
  return train.make_game(
    loss,
    models.init_gate(gate_cfg, jax.random.PRNGKey(1)),
    num_domains=_M.value,
    lr=3e-3,
    dual_lr=dual_lr,
    seed=0,
    ema_decay=_GATE_EMA.value,
  )


def bench_gate():
  n, out = _SCAN.value, {}
  for name, dual_lr in (("robust", 0.5), ("erm", 0.0)):
    step, state = _gate_game(dual_lr)
    t = _median_time(
      _threaded(lambda s, step=step: primal_dual.run(step, s, n)[0], state), _R.value
    )
    out[f"{name}_step_seconds"] = t / n
  out["ratio"] = out["robust_step_seconds"] / out["erm_step_seconds"]
  return out


def bench_scan():
  n, out = _SCAN.value, {}
  for unroll in map(int, _UNROLL.value):
    step, state = _gate_game(0.5)
    call = _threaded(lambda s, u=unroll, step=step: primal_dual.run(step, s, n, unroll=u)[0], state)
    out[unroll] = _median_time(call, _R.value)
    if unroll == 1 and _PROFILE.value:
      profile = _device_ops(call)
  # The same step, compiled with the same options, dispatched once per iteration.
  jstep = jax.jit(step, donate_argnums=0, compiler_options=primal_dual.COMPILER_OPTIONS)

  def loop(s):
    for _ in range(n):
      s, _ = jstep(s, None)
    return s

  _, state = _gate_game(0.5)
  loop_t = _median_time(_threaded(loop, state), _R.value)
  res = {"loop_step_seconds": loop_t / n}
  if _PROFILE.value and 1 in out:
    res["profile"] = profile
  for unroll, t in out.items():
    suffix = "" if unroll == 1 else f"_unroll{unroll}"
    res[f"scan_step_seconds{suffix}"], res[f"speedup{suffix}"] = t / n, loop_t / t
  # Ablation: the same scan compiled without primal_dual.COMPILER_OPTIONS (its graph's
  # kernels serialized on GPU); its time, and whether the results are bitwise equal.
  serial = jax.jit(
    primal_dual.run.__wrapped__,
    static_argnames=("step_fn", "num_steps"),
    donate_argnames=("state",),
  )
  _, state = _gate_game(0.5)
  res["scan_step_seconds_serial"] = (
    _median_time(_threaded(lambda s: serial(step, s, n)[0], state), _R.value) / n
  )
  (_, a), (_, b) = _gate_game(0.5), _gate_game(0.5)
  a, b = primal_dual.run(step, a, n), serial(step, b, n)
  res["serial_bitwise_equal"] = all(
    bool(np.array_equal(x, y))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  )
  return res


def bench_distill():
  """One distillation step: M expert forwards + gate (the teacher) + student fwd/bwd."""
  cfg = _lm_config()
  gate_cfg = models.GateConfig(num_experts=_M.value, vocab_size=_V.value, max_len=_T.value)
  d = _random_data(max(2 * _PER_DOMAIN.value, 8))
  expert_params = models.init_stacked_lm(cfg, jax.random.PRNGKey(0), _M.value)
  loss = distill.distill_loss_fn(
    cfg,
    expert_params,
    gate_cfg,
    models.init_gate(gate_cfg, jax.random.PRNGKey(1)),
    d,
    _PER_DOMAIN.value,
  )
  step, state = train.make_game(
    loss,
    models.init_lm(cfg, jax.random.PRNGKey(2)),
    num_domains=_M.value,
    lr=1e-3,
    dual_lr=0.0,
    seed=0,
  )
  n = _SCAN.value
  t = _median_time(_threaded(lambda s: primal_dual.run(step, s, n)[0], state), _R.value)
  tokens = _M.value * _PER_DOMAIN.value * _T.value
  return {
    "step_seconds": t / n,
    "student_tokens_per_s": tokens * n / t,
    "peak_bytes": _peak_memory(),
  }


def bench_cache():
  cfg = _lm_config()
  params = models.init_stacked_lm(cfg, jax.random.PRNGKey(0), _M.value)
  num_batches = 4
  d = _random_data(_B.value * num_batches // _M.value)
  group = experts.transformer_experts(cfg, params, [f"d{k}" for k in range(_M.value)])
  # build_cache moves batches host↔device by design: timed without the guard.
  t_cache = _median_time(
    lambda: experts.build_cache([group], d, batch_size=_B.value), max(2, _R.value // 3), guard=False
  )
  fwd = jax.jit(lambda p, x, y: models.stacked_token_logprobs(cfg, p, x, y))
  x, y = jnp.asarray(d.inputs_NxT[: _B.value]), jnp.asarray(d.targets_NxT[: _B.value])
  t_fwd = _median_time(lambda: fwd(params, x, y), _R.value)
  tokens = len(d.inputs_NxT) * _T.value
  return {
    "cache_tokens_per_s": tokens / t_cache,
    "forward_tokens_per_s": _B.value * _T.value / t_fwd,
    "ratio": (tokens / t_cache) / (_B.value * _T.value / t_fwd),
  }


def bench_inference():
  cfg = _lm_config()
  gate_cfg = models.GateConfig(num_experts=_M.value, vocab_size=_V.value, max_len=_T.value)
  key = jax.random.PRNGKey(0)
  expert_params = models.init_stacked_lm(cfg, key, _M.value)
  gate = models.init_gate(gate_cfg, key)
  student = models.init_lm(cfg, key)
  x = jax.random.randint(key, (_B.value, _T.value), 1, _V.value)
  y = jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
  mask = jnp.ones(x.shape, bool)
  teacher_fn = jax.jit(
    lambda e, g, x, y, m: distill.teacher_next_token_logprobs(cfg, e, gate_cfg, g, x, y, m)
  )
  student_fn = jax.jit(lambda p, x: models.next_token_logprobs(cfg, p, x))
  tokens = _B.value * _T.value
  t_teacher = _median_time(lambda: teacher_fn(expert_params, gate, x, y, mask), _R.value)
  t_student = _median_time(lambda: student_fn(student, x), _R.value)
  return {
    "teacher_tokens_per_s": tokens / t_teacher,
    "student_tokens_per_s": tokens / t_student,
    "speedup": t_teacher / t_student,
    "target_speedup": (_M.value + 1) / 2,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _XLA_ATTENTION.value:
    models._attention_implementation = lambda c: "xla"  # pylint: disable=protected-access
  cfg = _lm_config()
  result = {
    "device": str(jax.devices()[0].device_kind),
    "backend": jax.default_backend(),
    "num_devices": jax.device_count(),
    "host": platform.processor() or platform.machine(),
    "config": {
      "d_model": cfg.d_model,
      "num_layers": cfg.num_layers,
      "num_heads": cfg.num_heads,
      "d_ff": cfg.d_ff,
      "vocab": cfg.vocab_size,
      "seq_len": _T.value,
      "num_experts": _M.value,
      "dtype": cfg.dtype,
      "per_domain": _PER_DOMAIN.value,
      "gate_per_domain": _GATE_PER_DOMAIN.value,
      "gate_ema_decay": _GATE_EMA.value,
      "batch": _B.value,
      "scan_steps": _SCAN.value,
      "repeats": _R.value,
      "xla_attention": _XLA_ATTENTION.value,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
  }
  peak = None
  for phase in _PHASES.value:
    fn = {
      "matmul": bench_matmul,
      "experts": lambda peak=peak: bench_experts(peak),
      "gate": bench_gate,
      "scan": bench_scan,
      "distill": bench_distill,
      "cache": bench_cache,
      "inference": bench_inference,
    }.get(phase)
    if fn is None:
      raise app.UsageError(f"unknown phase {phase!r}")
    result[phase] = fn()
    if phase == "matmul":
      peak = result["matmul"]["flops_per_s"]
    print(
      f"{phase:10s} "
      + "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result[phase].items()
        if k != "profile"
      ),
      flush=True,
    )
    if "profile" in result[phase]:
      prof = result[phase]["profile"]
      print(
        f"{'':10s} one call: {prof['num_ops']} device ops, "
        f"{prof['device_seconds'] * 1e3:.3f} ms busy"
      )
      print(f"{'':12s}" + "  ".join(f"{k} {t * 1e3:.3f} ms" for k, t in prof["by_kind"].items()))
      for name, t, c in prof["ops"][:12]:
        print(f"{'':12s}{t * 1e3:9.3f} ms {c:6d}×  {name[:90]}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
