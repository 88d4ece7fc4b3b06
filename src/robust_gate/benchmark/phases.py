"""The benchmark phases, each `config -> record`: random tokens at the configured sizes
(throughput does not depend on the text), compiled and warmed, then timed."""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import data, distill, experts, models, primal_dual, shards, streaming, train
from robust_gate.benchmark import records
from robust_gate.benchmark.config import BenchmarkConfig
from robust_gate.benchmark.timing import device_profile, median_seconds, peak_memory_bytes, threaded

# Initializers compiled once per config: op by op, a transformer's init compiles
# each small op separately, which takes longer than a small benchmark itself.
_init_stacked_lm = jax.jit(models.init_stacked_lm, static_argnums=(0, 2))
_init_lm = jax.jit(models.init_lm, static_argnums=0)
_init_gate = jax.jit(models.init_gate, static_argnums=0)


def model_flops_per_token(cfg: models.LMConfig) -> float:
  """Training FLOPs per token of one model: 6·(dense params) + 12·L·T·d attention."""
  d, f, L = cfg.d_model, cfg.d_ff, cfg.num_layers
  dense = L * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
  return 6.0 * dense + 12.0 * L * cfg.max_len * d


def mfu(model_tflops: float, tflops_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilization of a step split over `num_devices`: the achieved rate
  over the peak of all of them (one device's peak would over-report by the count)."""
  return model_tflops / (tflops_per_device * num_devices)


def _random_data(c: BenchmarkConfig, num_per_domain: int) -> data.DomainData:
  """Random full-length token sequences (T−1 tokens + EOS), M domains."""
  rng = np.random.default_rng(0)
  n = num_per_domain * c.num_experts
  seqs = list(rng.integers(1, c.vocab, size=(n, c.seq_len - 1)))
  return data.encode(
    seqs,
    np.arange(n) % c.num_experts,
    [f"d{k}" for k in range(c.num_experts)],
    vocab_size=c.vocab,
    max_len=c.seq_len,
  )


def serial_run(step, state, num_steps: int):
  """The scan phase's ablation: primal_dual.run's program compiled without
  primal_dual.COMPILER_OPTIONS (the same program; only XLA's options differ)."""
  return primal_dual.run(step, state, num_steps, concurrent=False)


def bitwise_equal(a, b) -> bool:
  """Whether two pytrees hold the same arrays bit for bit: same structure, dtypes,
  shapes and bytes (so −0.0 ≠ 0.0, and a NaN equals the same NaN), unlike ==."""

  def same(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

  try:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(same, a, b)))
  except ValueError:  # different tree structures
    return False


def _scan_call(step, state, num_steps: int, unroll: int = 1):
  return threaded(lambda s: primal_dual.run(step, s, num_steps, unroll=unroll)[0], state)


def matmul(c: BenchmarkConfig) -> records.Matmul:
  """n×n×n products on random data, 10 dispatched back to back per timed call (one
  product per call would also time the host's launch and wait)."""
  n, dt = c.matmul_size, jnp.dtype(c.dtype)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
  bs = [jax.random.normal(jax.random.PRNGKey(k), (n, n), dt) for k in range(1, 3)]
  f = jax.jit(lambda a, b: a @ b)
  t = median_seconds(lambda: [f(a, bs[k % 2]) for k in range(10)], c.repeats) / 10
  return records.Matmul(size=n, matmul_seconds=t, tflops_per_device=2.0 * n**3 / t / 1e12)


def experts_training(c: BenchmarkConfig, tflops_per_device: float | None = None) -> records.Experts:
  """Expert training steps; MFU against `tflops_per_device` (the matmul phase's)."""
  cfg, M = c.lm_config(), c.num_experts
  step, state = train.make_game(
    train.expert_loss_fn(cfg, _random_data(c, max(2 * c.per_domain, 8)), c.per_domain),
    _init_stacked_lm(cfg, jax.random.PRNGKey(0), M),
    num_domains=M,
    lr=1e-3,
    dual_lr=0.0,
    seed=0,
  )
  params = experts.num_params(state.params) // M
  call = _scan_call(step, state, c.scan_steps)
  t = median_seconds(call, c.repeats) / c.scan_steps
  tokens = M * c.per_domain * c.seq_len
  flops = model_flops_per_token(cfg) * tokens
  num_devices = jax.device_count()
  peak = None if tflops_per_device is None else tflops_per_device * num_devices
  return records.Experts(
    step_seconds=t,
    tokens_per_second=tokens / t,
    model_flops_per_step=flops,
    model_tflops=flops / t / 1e12,
    params_per_expert=params,
    num_devices=num_devices,
    peak_tflops=peak,
    mfu=None
    if tflops_per_device is None
    else mfu(flops / t / 1e12, tflops_per_device, num_devices),
    peak_memory_bytes=peak_memory_bytes(),
    profile=device_profile(call) if c.profile else None,
  )


@functools.lru_cache(maxsize=2)
def _gate_game(c: BenchmarkConfig, dual_lr: float):
  """A gate's game over a random cache of normalized expert log-probs, built once
  per config and dual step size: one step function, so the gate and scan phases
  share its compiled programs. Its state is only copied (`_gate_start`)."""
  return _gate_game_on(c, streaming.Source(*_gate_data(c)), dual_lr)


def _gate_data(c: BenchmarkConfig) -> tuple[data.DomainData, np.ndarray]:
  """Random sequences and a random cache of normalized expert log-probs on them."""
  d = _random_data(c, max(2 * c.gate_per_domain, 8))
  noise = jax.random.normal(jax.random.PRNGKey(0), (*d.inputs_NxT.shape, c.num_experts, 4))
  cache = np.asarray(jax.nn.log_softmax(noise))[..., 0]
  return d, np.where(d.mask_NxT[..., None], cache, 0.0).astype(np.float32)


def _gate_game_on(c: BenchmarkConfig, source: streaming.Source, dual_lr: float):
  gate_cfg, M = c.gate_config(), c.num_experts
  return train.make_game(
    train.gate_loss_fn(gate_cfg, source, None, c.gate_per_domain, jnp.zeros(M)),
    _init_gate(gate_cfg, jax.random.PRNGKey(1)),
    num_domains=M,
    lr=3e-3,
    dual_lr=dual_lr,
    seed=0,
    ema_decay=c.gate_ema_decay,
  )


def _gate_start(c: BenchmarkConfig, dual_lr: float):
  """(step, a fresh copy of the initial state): a timed call donates its state."""
  step, state = _gate_game(c, dual_lr)
  return step, jax.tree_util.tree_map(jnp.copy, state)


def gate(c: BenchmarkConfig) -> records.Gate:
  seconds = {}
  for name, dual_lr in (("robust", 0.5), ("erm", 0.0)):
    step, state = _gate_start(c, dual_lr)
    seconds[name] = median_seconds(_scan_call(step, state, c.scan_steps), c.repeats)
  return records.Gate(
    robust_step_seconds=seconds["robust"] / c.scan_steps,
    erm_step_seconds=seconds["erm"] / c.scan_steps,
    robust_over_erm=seconds["robust"] / seconds["erm"],
  )


def scan(c: BenchmarkConfig) -> records.Scan:
  n = c.scan_steps
  step, state = _gate_start(c, 0.5)
  call = _scan_call(step, state, n)
  scan_t = median_seconds(call, c.repeats) / n
  profile = device_profile(call) if c.profile else None
  unrolled = {}
  for u in c.scan_unrolls:
    unrolled[u] = median_seconds(_scan_call(step, _gate_start(c, 0.5)[1], n, u), c.repeats) / n
  # The same step, compiled with the same options, dispatched once per iteration.
  jstep = jax.jit(step, donate_argnums=0, compiler_options=primal_dual.COMPILER_OPTIONS)

  def loop(s):
    for _ in range(n):
      s, _ = jstep(s, None)
    return s

  loop_t = median_seconds(threaded(loop, _gate_start(c, 0.5)[1]), c.repeats) / n
  serial_call = threaded(lambda s: serial_run(step, s, n)[0], _gate_start(c, 0.5)[1])
  serial_t = median_seconds(serial_call, c.repeats) / n
  equal = bitwise_equal(
    primal_dual.run(step, _gate_start(c, 0.5)[1], n),
    serial_run(step, _gate_start(c, 0.5)[1], n),
  )
  return records.Scan(
    scan_step_seconds=scan_t,
    loop_step_seconds=loop_t,
    scan_speedup=loop_t / scan_t,
    serial_scan_step_seconds=serial_t,
    serial_bitwise_equal=equal,
    unroll_step_seconds=unrolled,
    profile=profile,
  )


STREAM_CHUNKS = 4  # chunks of scan_steps per timed train.fit call of the stream phase


def stream(c: BenchmarkConfig) -> records.Stream:
  """The robust gate's training loop, train.fit over STREAM_CHUNKS chunks of
  scan_steps, resident (rows drawn inside jit from the cache on the devices) against
  streamed (each chunk's rows gathered by the host, the next chunk's while one runs)
  from memory and from disk shards through memory maps (page cache warm)."""
  d, cache = _gate_data(c)
  n = STREAM_CHUNKS * c.scan_steps
  seconds, finals = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    on_disk = shards.build(
      tmp,
      fingerprint="benchmark",
      shape=cache.shape,
      dtype=cache.dtype,
      shard_rows=-(-len(cache) // 4),  # rows in several shards, as a large cache's are
      compute=lambda lo, hi: cache[lo:hi],
      log=lambda s: None,
    )
    games = {
      "resident": _gate_game_on(c, streaming.Source(d, cache), 0.5),
      "streamed": _gate_game_on(c, streaming.Source(d, cache, stream=True), 0.5),
      "disk": _gate_game_on(c, streaming.Source(d, on_disk, stream=True), 0.5),
    }
    feed, key = games["disk"][0].feed, streaming.host_copy(games["disk"][1].key)
    gather = lambda: feed.batches(key, 0, c.scan_steps)
    gather_seconds = median_seconds(gather, c.repeats, guard=False) / c.scan_steps
    for name, (step, state) in games.items():  # each state is donated: timed last
      seconds[name], finals[name] = _fit_seconds(c, step, state, n)
  return records.Stream(
    resident_step_seconds=seconds["resident"],
    streamed_step_seconds=seconds["streamed"],
    disk_step_seconds=seconds["disk"],
    streamed_over_resident=seconds["streamed"] / seconds["resident"],
    disk_over_resident=seconds["disk"] / seconds["resident"],
    gather_step_seconds=gather_seconds,
    bitwise_equal=bitwise_equal(finals["streamed"], finals["resident"])
    and bitwise_equal(finals["disk"], finals["resident"]),
  )


def _fit_seconds(c: BenchmarkConfig, step, state, num_steps: int):
  """(seconds per step of train.fit, the state after one call from `state`)."""
  fit = lambda s: train.fit(
    step, s, int(s.step) + num_steps, name="stream", log=_quiet, chunk=c.scan_steps
  )[0]
  final = fit(jax.tree_util.tree_map(jnp.copy, state))
  # A streamed loop puts rows on the devices by design: timed without the guard.
  return median_seconds(threaded(fit, state), c.repeats, guard=False) / num_steps, final


def _quiet(line: str) -> None:
  del line


def distillation(c: BenchmarkConfig) -> records.Distill:
  """One distillation step: M expert forwards + gate (the teacher) + student fwd/bwd."""
  cfg, gate_cfg, M = c.lm_config(), c.gate_config(), c.num_experts
  loss = distill.distill_loss_fn(
    cfg,
    _init_stacked_lm(cfg, jax.random.PRNGKey(0), M),
    gate_cfg,
    _init_gate(gate_cfg, jax.random.PRNGKey(1)),
    _random_data(c, max(2 * c.per_domain, 8)),
    c.per_domain,
  )
  step, state = train.make_game(
    loss, _init_lm(cfg, jax.random.PRNGKey(2)), num_domains=M, lr=1e-3, dual_lr=0.0, seed=0
  )
  t = median_seconds(_scan_call(step, state, c.scan_steps), c.repeats) / c.scan_steps
  return records.Distill(
    step_seconds=t,
    student_tokens_per_second=M * c.per_domain * c.seq_len / t,
    peak_memory_bytes=peak_memory_bytes(),
  )


def cache(c: BenchmarkConfig) -> records.Cache:
  cfg, M, B = c.lm_config(), c.num_experts, c.batch
  params = _init_stacked_lm(cfg, jax.random.PRNGKey(0), M)
  d = _random_data(c, max(B * 4 // M, 1))
  group = experts.transformer_experts(cfg, params, [f"d{k}" for k in range(M)])
  # build_cache moves batches host↔device by design: timed without the guard.
  t_cache = median_seconds(
    lambda: experts.build_cache([group], d, batch_size=B), max(2, c.repeats // 3), guard=False
  )
  fwd = jax.jit(lambda p, x, y: models.stacked_token_logprobs(cfg, p, x, y))
  x, y = jnp.asarray(d.inputs_NxT[:B]), jnp.asarray(d.targets_NxT[:B])
  t_fwd = median_seconds(lambda: fwd(params, x, y), c.repeats)
  cache_rate = len(d.inputs_NxT) * c.seq_len / t_cache
  fwd_rate = len(x) * c.seq_len / t_fwd
  return records.Cache(
    cache_tokens_per_second=cache_rate,
    forward_tokens_per_second=fwd_rate,
    cache_over_forward=cache_rate / fwd_rate,
  )


def inference(c: BenchmarkConfig) -> records.Inference:
  cfg, gate_cfg, M, B, T = c.lm_config(), c.gate_config(), c.num_experts, c.batch, c.seq_len
  key = jax.random.PRNGKey(0)
  expert_params = _init_stacked_lm(cfg, key, M)
  gate_params = _init_gate(gate_cfg, key)
  student = _init_lm(cfg, key)
  x = jax.random.randint(key, (B, T), 1, c.vocab)
  y = jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
  mask = jnp.ones(x.shape, bool)
  teacher_fn = jax.jit(
    lambda e, g, x, y, m: distill.teacher_next_token_logprobs(cfg, e, gate_cfg, g, x, y, m)
  )
  student_fn = jax.jit(lambda p, x: models.next_token_logprobs(cfg, p, x))
  t_teacher = median_seconds(lambda: teacher_fn(expert_params, gate_params, x, y, mask), c.repeats)
  t_student = median_seconds(lambda: student_fn(student, x), c.repeats)
  return records.Inference(
    teacher_tokens_per_second=B * T / t_teacher,
    student_tokens_per_second=B * T / t_student,
    student_speedup=t_teacher / t_student,
    target_speedup=(M + 1) / 2,
  )
