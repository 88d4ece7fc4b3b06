"""Streaming: minibatches gathered by the host, from memory or disk (robust_gate.streaming,
robust_gate.shards), against the resident path that draws them inside jit.

A streamed game is the resident game: the same final state and per-step metrics, bit
for bit on CPU, for the experts (tokens memory-mapped from disk) and for the gate game
(its cache and its dual's held-out cache streamed). A cache over the memory budget is
written in disk shards and streamed from them; a run killed mid-stream and resumed
from its checkpoint ends where an uninterrupted one does; 8 simulated devices give the
8-device resident run bitwise and the 1-device run to float32 rounding; a damaged
shard is found and rebuilt.
"""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from devices import env_with_devices

from robust_gate import checkpoints, data, distill, experts, models, shards, streaming, train
from robust_gate.benchmark.phases import bitwise_equal
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
K, M, T, V = 3, 2, 8, 9
B = 8  # per domain: divides over 8 devices
STEPS, CHUNK = 6, 3  # two chunks of one compiled length


def _split(n: int, seed: int) -> data.DomainData:
  """Unequal domains (so that stratification matters), sequences of 1..T−2 tokens."""
  rng = np.random.default_rng(seed)
  seqs = [rng.integers(1, V, size=rng.integers(1, T - 1)) for _ in range(n)]
  labels = np.concatenate([np.arange(K), rng.choice(K, n - K, p=[0.5, 0.3, 0.2])])
  return data.encode(seqs, labels, ["a", "b", "c"], vocab_size=V, max_len=T)


def _cache(d: data.DomainData, seed: int) -> np.ndarray:
  """Each expert's log-probabilities of the targets, drawn on the host (numpy: no
  program compiled for test data)."""
  noise = np.random.default_rng(seed).normal(size=(*d.inputs_NxT.shape, M, V))
  logp = (noise - scipy.special.logsumexp(noise, axis=-1, keepdims=True))[..., 0]
  return np.where(d.mask_NxT[..., None], logp, 0.0).astype(np.float32)


def _unigram(probs_V, name: str) -> experts.Expert:
  logp_V = jnp.log(jnp.asarray(probs_V, jnp.float32))
  return experts.Expert((name,), len(probs_V), lambda x, y: logp_V[y], fingerprint=name)


EXPERTS = [_unigram(np.full(V, 1 / V), "flat"), _unigram(np.linspace(1, 2, V) / 13.5, "ramp")]
GATE = models.GateConfig(num_experts=M, vocab_size=V, max_len=T)
LM = models.LMConfig(vocab_size=V, max_len=T, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _gate_game(fit: streaming.Source, held: streaming.Source):
  """The robust gate's game: primal on `fit`, dual on `held`, an EMA."""
  loss = train.gate_loss_fn(GATE, fit, None, B, jnp.zeros(K))
  return train.make_game(
    loss,
    models.init_gate(GATE, jax.random.PRNGKey(1)),
    num_domains=K,
    lr=1e-2,
    dual_lr=0.5,
    seed=0,
    ema_decay=0.9,
    dual_on=train.gate_loss_fn(GATE, held, None, B, jnp.zeros(K)),
  )


def _lms(seed: int, n: int | None = None):
  """The first n of K language models from init_stacked_lm at (LM, K) (n None: the
  first, unstacked): one compiled program for every model these tests initialize (each
  other static argument would compile it again), drawn with an "rbg" key (XLA's
  RngBitGenerator compiles in about a second on CPU, threefry's init in several)."""
  return _first(models.init_stacked_lm(LM, jax.random.key(seed, impl="rbg"), K), n)


@functools.partial(jax.jit, static_argnums=1)
def _first(stack, n: int | None):
  return jax.tree_util.tree_map(lambda x: x[0] if n is None else x[:n], stack)


def _expert_game(d):
  params = _lms(0, K)
  return train.make_game(
    train.expert_loss_fn(LM, d, B), params, num_domains=K, lr=1e-2, dual_lr=0.0, seed=0
  )


def _distill_game(d):
  """A student distilled from two stacked experts under a gate (the main job's
  distillation, robust_gate.distill), its rows from `d`."""
  experts_M = _lms(2, M)
  gate = models.init_gate(GATE, jax.random.PRNGKey(1))
  loss = distill.distill_loss_fn(LM, experts_M, GATE, gate, d, B)
  student = _lms(4)
  lam_K = jnp.asarray([0.5, 0.3, 0.2])
  return train.make_game(loss, student, num_domains=K, lr=1e-2, dual_lr=0.0, seed=0, lam_K=lam_K)


def _fit(game, steps=STEPS, **kwargs):
  step, state = game
  return train.fit(step, state, steps, name="g", log=lambda s: None, chunk=CHUNK, **kwargs)


def runs() -> dict:
  """Every game resident and streamed: {name: (final state, history)}. Also what the
  8-device child runs."""
  fit, held = _split(60, 0), _split(30, 1)
  fit_c, held_c = _cache(fit, 0), _cache(held, 1)
  with tempfile.TemporaryDirectory() as tmp:
    on_disk = shards.write_split(os.path.join(tmp, "train"), fit, log=lambda s: None)
    assert isinstance(on_disk.inputs_NxT, np.memmap)
    return {
      "experts": _fit(_expert_game(fit)),
      "experts_streamed": _fit(_expert_game(streaming.Source(on_disk, stream=True))),
      "distill": _fit(_distill_game(fit)),
      "distill_streamed": _fit(_distill_game(streaming.Source(on_disk, stream=True))),
      "gate": _fit(_gate_game(streaming.Source(fit, fit_c), streaming.Source(held, held_c))),
      "gate_streamed": _fit(
        _gate_game(streaming.Source(fit, fit_c, True), streaming.Source(held, held_c, True))
      ),
    }


@pytest.fixture(scope="module")
def one():
  return runs()


def test_the_host_draws_the_rows_the_step_draws():
  """StreamedLoss.indices = data.stratified_batch at fold_in(key, t) (and the dual's
  fold_in(·, 1)), the keys primal_dual.make_step gives its losses."""
  d = _split(60, 0)
  loss = train.gate_loss_fn(GATE, streaming.Source(d, _cache(d, 0), True), None, B, jnp.zeros(K))
  key = jax.random.PRNGKey(7)
  got, dual = (loss.indices(np.asarray(key), 5, 4, fold) for fold in (None, 1))
  index = data.domain_index(d)
  draw = jax.jit(data.stratified_batch, static_argnums=2)
  for i, t in enumerate(range(5, 9)):
    step_key = jax.random.fold_in(key, jnp.int32(t))
    np.testing.assert_array_equal(got[i], draw(step_key, index, B))
    np.testing.assert_array_equal(dual[i], draw(jax.random.fold_in(step_key, 1), index, B))
  assert np.all(d.domain_N[got] == np.arange(K)[None, :, None])  # stratified


def test_streamed_experts_equal_resident_bitwise(one):
  """Expert training with its tokens memory-mapped from disk = from the devices."""
  assert bitwise_equal(one["experts_streamed"], one["experts"])
  assert int(one["experts"][0].step) == STEPS


def test_streamed_distillation_equals_resident_bitwise(one):
  """Distillation with the student's tokens memory-mapped from disk = from the devices."""
  assert bitwise_equal(one["distill_streamed"], one["distill"])
  assert int(one["distill"][0].step) == STEPS


def test_streamed_gate_game_equals_resident_bitwise(one):
  """The robust gate's game, its primal's and its dual's rows streamed, = resident: λ,
  λ̄, the EMA, every step's losses and the dual's."""
  assert bitwise_equal(one["gate_streamed"], one["gate"])
  assert set(one["gate"][1]) == {"losses", "lam", "dual_losses"}


def test_dual_on_is_the_dual_loss_fn_it_replaces(one):
  """make_game's dual_on (a resident loss) = the dual_loss_fn wrapper phases use today."""
  fit, held = _split(60, 0), _split(30, 1)
  held_loss = train.gate_loss_fn(GATE, held, _cache(held, 1), B, jnp.zeros(K))
  step, state = train.make_game(
    train.gate_loss_fn(GATE, fit, _cache(fit, 0), B, jnp.zeros(K)),
    models.init_gate(GATE, jax.random.PRNGKey(1)),
    num_domains=K,
    lr=1e-2,
    dual_lr=0.5,
    seed=0,
    ema_decay=0.9,
    dual_loss_fn=lambda params, key: held_loss(params, None, key),
  )
  assert bitwise_equal(_fit((step, state)), one["gate"])


def test_a_cache_over_the_budget_is_streamed_from_disk_shards(tmp_path):
  """stored_scores: under the budget the .npz in memory; over it, shards on disk. The
  game streams from the shards (no device array of the cache's shape exists) and ends
  as the resident game on the same numbers does."""
  fit, held = _split(62, 2), _split(20, 1)  # held: 2720 bytes on a device, fit: 8432
  small = experts.stored_scores(str(tmp_path / "held"), EXPERTS, held, budget_bytes=10**6)
  assert isinstance(small, np.ndarray) and os.path.exists(tmp_path / "held.npz")
  budget = experts.cache_bytes(fit, EXPERTS) - 1  # 3967: fit's cache alone is over it
  big = experts.stored_scores(
    str(tmp_path / "fit"), EXPERTS, fit, budget_bytes=budget, shard_rows=16
  )
  assert isinstance(big, shards.ShardedArray) and len(big.maps) == 4  # 62 rows in 16s
  assert all(isinstance(m, np.memmap) for m in big.maps)
  np.testing.assert_allclose(np.asarray(big), experts.build_cache(EXPERTS, fit), rtol=1e-6)
  source = streaming.choose(fit, big, budget_bytes=budget)
  assert source.stream and not streaming.choose(held, small, budget_bytes=budget).stream
  step, state = _gate_game(source, streaming.Source(held, small))
  assert not [a for a in jax.live_arrays() if a.shape == big.shape]  # never on a device
  streamed = _fit((step, state))
  resident = _fit(_gate_game(streaming.Source(fit, np.asarray(big)), streaming.Source(held, small)))
  assert bitwise_equal(streamed, resident)


def test_a_run_killed_mid_stream_resumes_to_the_same_end(one, tmp_path):
  """Killed after its checkpoint at step 3 of 6 (by its progress line, while the next
  chunk's rows are being gathered), a streamed run started again from that checkpoint
  ends bitwise where an uninterrupted run does: the checkpoint's step is the stream's
  position."""
  fit, held = _split(60, 0), _split(30, 1)
  fit_c, held_c = _cache(fit, 0), _cache(held, 1)
  step, initial = _gate_game(
    streaming.Source(fit, fit_c, True), streaming.Source(held, held_c, True)
  )
  fresh = lambda: jax.tree_util.tree_map(jnp.copy, initial)  # fit donates it

  class Killed(Exception):
    pass

  def kill(line):
    raise Killed(line)

  directory = str(tmp_path / "gate")
  ckpt = lambda: checkpoints.Checkpointer(directory, {}, name="g", log=lambda s: None)
  with pytest.raises(Killed, match="step 3/6"):
    train.fit(step, fresh(), STEPS, name="g", log=kill, chunk=CHUNK, checkpointer=ckpt())
  assert checkpoints.saved_steps(directory) == [3]
  lines: list[str] = []
  resumed = train.fit(
    step, fresh(), STEPS, name="g", log=lines.append, chunk=CHUNK, checkpointer=ckpt()
  )
  assert lines[0].startswith("g: resumed at step 3")
  whole = one["gate_streamed"]
  assert bitwise_equal(resumed[0], whole[0])
  # Steps 1–3 come back from metrics.jsonl (JSON numbers: float32 values exactly).
  assert bitwise_equal({k: v.astype(np.float32) for k, v in resumed[1].items()}, whole[1])


_CHILD = r"""
import json, sys
import jax
import numpy as np
sys.path.insert(0, "tests")
import test_streaming as t
from robust_gate.benchmark.phases import bitwise_equal

r = t.runs()
out = {"devices": jax.device_count()}
for name in ("experts", "distill", "gate"):
  out[name + "_bitwise"] = bitwise_equal(r[name + "_streamed"], r[name])
  state, history = r[name + "_streamed"]
  out[name] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves((state, history))]
print(json.dumps(out))
"""


def test_eight_devices_stream_what_one_does(one):
  """On 8 simulated devices the streamed games equal the 8-device resident ones bit for
  bit, and the 1-device runs to float32 rounding (sums split over devices)."""
  env = env_with_devices(8)
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.strip().splitlines()[-1])
  assert eight["devices"] == 8
  assert all(eight[f"{name}_bitwise"] is True for name in ("experts", "distill", "gate"))
  for name in ("experts", "distill", "gate"):
    leaves = jax.tree_util.tree_leaves(one[name + "_streamed"])
    for got, want in zip(eight[name], leaves, strict=True):
      np.testing.assert_allclose(
        np.asarray(got, np.asarray(want).dtype), want, rtol=1e-5, atol=1e-6
      )


_PROCESS = r"""
import json, sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
sys.path.insert(0, "tests")
import test_streaming as t
from robust_gate import streaming
from robust_gate.benchmark.phases import bitwise_equal


class Counted:  # the fit cache, counting the rows this process reads
  def __init__(self, a):
    self.a, self.shape, self.dtype, self.read = a, a.shape, a.dtype, 0

  def __getitem__(self, rows):
    self.read += len(rows)
    return self.a[rows]


fit, held = t._split(60, 0), t._split(30, 1)
fit_c, held_c = t._cache(fit, 0), t._cache(held, 1)
counted = Counted(fit_c)
held_s = streaming.Source(held, held_c, True)
streamed = t._fit(t._gate_game(streaming.Source(fit, counted, True), held_s))
resident = t._fit(t._gate_game(streaming.Source(fit, fit_c), streaming.Source(held, held_c)))
leaves = jax.tree_util.tree_leaves(streamed)
print(json.dumps({
  "devices": [jax.device_count(), jax.local_device_count()],
  "bitwise": bitwise_equal(streamed, resident),
  "rows_read": counted.read,
  "leaves": [np.asarray(x).tolist() for x in leaves],
}))
"""


def test_each_of_two_processes_gathers_only_its_own_rows(one):
  """2 processes × 4 CPU devices: each process reads half of every step's rows (its
  devices' shards of the global batch); the streamed game equals the resident game of
  the same processes bitwise, and the 1-process run to float32 rounding."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    address = f"localhost:{sock.getsockname()[1]}"
  env = env_with_devices(4)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PROCESS, address, str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
      cwd=ROOT,
    )
    for i in (0, 1)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  want = jax.tree_util.tree_leaves(one["gate_streamed"])
  for stdout, _ in outs:
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["devices"] == [8, 4] and r["bitwise"] is True
    assert r["rows_read"] == STEPS * K * B // 2  # half of the global batch, every step
    for got, w in zip(r["leaves"], want, strict=True):
      np.testing.assert_allclose(np.asarray(got, np.asarray(w).dtype), w, rtol=1e-5, atol=1e-6)


def _flip(path: str, offset: int) -> None:
  """One bit of the byte at `offset` flipped: a value still, caught by the digest."""
  raw = bytearray(pathlib.Path(path).read_bytes())
  raw[offset] ^= 0x01
  pathlib.Path(path).write_bytes(bytes(raw))


def test_a_damaged_shard_is_announced_and_rebuilt(tmp_path):
  """A flipped byte in one shard: that shard alone is scored again (announced); the
  cache is whole again. A cache of other data is refused, nothing overwritten."""
  d = _split(60, 0)
  directory = str(tmp_path / "cache")
  fresh = np.asarray(experts.sharded_scores(directory, EXPERTS, d, shard_rows=16, log=pytest.fail))
  _flip(os.path.join(directory, "shard_00001.npy"), -7)
  other = [os.path.getmtime(os.path.join(directory, f"shard_0000{i}.npy")) for i in (0, 2, 3)]
  lines: list[str] = []
  again = experts.sharded_scores(directory, EXPERTS, d, shard_rows=16, log=lines.append)
  assert lines == [
    f"cache {directory}: shard 1 (rows 16–31) is damaged (its SHA-1 "
    + lines[0].split("SHA-1 ")[1].split(")")[0]
    + "); rebuilding it.",
    f"cache {directory}: keeping 3 of its 4 shards; computing the other 1.",
  ]
  assert "is not the manifest's" in lines[0]
  np.testing.assert_array_equal(np.asarray(again), fresh)
  assert other == [
    os.path.getmtime(os.path.join(directory, f"shard_0000{i}.npy")) for i in (0, 2, 3)
  ]
  with pytest.raises(InputError, match="built for other data or other experts"):
    experts.sharded_scores(directory, EXPERTS, d.subset(np.arange(50)), shard_rows=16)
  np.testing.assert_array_equal(np.asarray(shards.open_array(directory)), fresh)


def test_an_interrupted_build_keeps_its_whole_shards(tmp_path):
  """A build that dies at its third shard resumes there: shards 0 and 1 are kept, not
  computed again; a damaged manifest means every shard is computed again."""
  full = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
  computed = []

  def compute(lo, hi, fail_at=None):
    if lo == fail_at:
      raise KeyboardInterrupt
    computed.append(lo)
    return full[lo:hi]

  kw = dict(fingerprint="f", shape=full.shape, dtype=np.float32, shard_rows=10, log=print)
  directory = str(tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    shards.build(directory, compute=lambda lo, hi: compute(lo, hi, fail_at=20), **kw)
  assert computed == [0, 10]
  a = shards.build(directory, compute=compute, **kw)
  assert computed == [0, 10, 20, 30]
  np.testing.assert_array_equal(np.asarray(a), full)
  pathlib.Path(directory, shards.MANIFEST).write_text("{")
  lines: list[str] = []
  shards.build(directory, compute=compute, **{**kw, "log": lines.append})
  assert computed[4:] == [0, 10, 20, 30] and "is damaged (not a shard manifest)" in lines[0]


def test_sharded_arrays_select_like_numpy(tmp_path):
  """Rows (indices, repeats, negatives, masks, slices) and last-axis entries select
  lazily and read what numpy's indexing gives."""
  full = np.random.default_rng(0).normal(size=(23, 4, 3)).astype(np.float32)
  kw = dict(fingerprint="f", shape=full.shape, dtype=np.float32, shard_rows=5)
  a = shards.build(str(tmp_path), compute=lambda lo, hi: full[lo:hi], log=print, **kw)
  idx = np.array([22, 0, 5, 5, -1, 13])
  np.testing.assert_array_equal(a.take(idx), full[idx])
  for key in (idx, slice(3, 20, 4), full[:, 0, 0] > 0):
    view = a[key]
    assert isinstance(view, shards.ShardedArray) and view.shape == full[key].shape
    np.testing.assert_array_equal(np.asarray(view), full[key])
    np.testing.assert_array_equal(np.asarray(view[..., 1]), full[key][..., 1])
    np.testing.assert_array_equal(np.asarray(view[..., [2, 0]][1:3]), full[key][..., [2, 0]][1:3])
  np.testing.assert_array_equal(a[3:7, 1], full[3:7, 1])  # any other index: read, then applied
  with pytest.raises(IndexError):
    a.take([23])


def test_a_streamed_loss_outside_jit_gathers_its_own_rows():
  """With a concrete key (gradient_conflict evaluates a loss at one key) a streamed loss
  with batch None gathers the key's rows and equals the resident loss; with a traced
  key it says that its rows come in the batch."""
  d = _split(60, 0)
  c = _cache(d, 0)
  params = models.init_gate(GATE, jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(3)
  resident = train.gate_loss_fn(GATE, d, c, B, jnp.zeros(K))
  streamed = train.gate_loss_fn(GATE, streaming.Source(d, c, True), None, B, jnp.zeros(K))
  want = jax.jit(lambda p: resident(p, None, key))(params)
  got = jax.jit(lambda p: streamed(p, None, key))(params)  # its rows constants: rounding
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="reads its rows from `batch`"):
    jax.jit(streamed)(params, None, key)


def test_an_on_disk_split_is_checked_when_opened(tmp_path):
  d = _split(20, 0)
  directory = str(tmp_path / "split")
  opened = shards.write_split(directory, d, log=pytest.fail)
  assert opened.fingerprint() == d.fingerprint() and opened.domains == d.domains
  _flip(os.path.join(directory, "targets_NxT", "shard_00000.npy"), -1)
  with pytest.raises(InputError, match="cannot be computed here; write it again"):
    shards.open_split(directory, log=lambda s: None)


def test_the_pipeline_reads_its_splits_from_disk(tmp_path, monkeypatch):
  """The main job's splits are written once from the prepared dataset, then memory-mapped
  from disk without reading it; a damaged split file is announced and written again."""
  from robust_gate import config_files, pipeline  # pylint: disable=g-import-not-at-top

  config = config_files.load(TINY)
  data_dir = str(tmp_path / "data")
  every = lambda splits: [getattr(splits, name) for name in ("train", "validation", "test")]
  first = every(pipeline.load_splits(config, data_dir, log=lambda s: None))
  assert all(isinstance(s.inputs_NxT, np.memmap) for s in first)
  fingerprints = [s.fingerprint() for s in first]

  def unread(*args, **kwargs):
    raise AssertionError("the prepared dataset was read again")

  with monkeypatch.context() as m:
    m.setattr(data, "read_local", unread)
    again = every(pipeline.load_splits(config, data_dir, log=pytest.fail))
  assert [s.fingerprint() for s in again] == fingerprints
  train_dir = os.path.join(pipeline.split_dir(config, data_dir), "train")
  _flip(os.path.join(train_dir, "targets_NxT", "shard_00000.npy"), -1)
  logs: list[str] = []
  mended = every(pipeline.load_splits(config, data_dir, log=logs.append))
  assert [s.fingerprint() for s in mended] == fingerprints
  assert any(train_dir in line and "Writing it again" in line for line in logs), logs


def test_the_pipeline_writes_a_split_a_block_at_a_time(tmp_path, monkeypatch):
  """`load_splits` reads the prepared dataset a block of sequences at a time (here 7) and
  writes the same split as one read into memory whole: every array and fingerprint."""
  from robust_gate import config_files, datasets, pipeline  # pylint: disable=g-import-not-at-top

  config = config_files.load(TINY)
  data_dir, T, options = str(tmp_path / "data"), config.data.max_len, dict(config.data.options)
  quiet = lambda s: None
  whole = [
    data.load_local(config.data.name, s, data_dir, T, quiet, **options) for s in datasets.SPLITS
  ]
  sizes, read = [], data.from_data_source
  monkeypatch.setattr(
    data, "from_data_source", lambda e, **kw: sizes.append(len(e)) or read(e, **kw)
  )
  monkeypatch.setattr(pipeline, "_BYTES_PER_TOKEN", shards.SHARD_BYTES // (7 * T))
  splits = pipeline.load_splits(config, data_dir, log=quiet)
  assert max(sizes) == 7 and sum(sizes) == sum(len(d.domain_N) for d in whole)
  for d, name in zip(whole, datasets.SPLITS):
    got = getattr(splits, name)
    assert isinstance(got.inputs_NxT, np.memmap) and got.fingerprint() == d.fingerprint()
    for column in ("inputs_NxT", "targets_NxT", "mask_NxT", "domain_N"):
      np.testing.assert_array_equal(getattr(got, column), getattr(d, column))
  assert not any(p.endswith(".writing") for p in os.listdir(pipeline.split_dir(config, data_dir)))
