"""Minibatches gathered by the host: the input path for data the devices do not hold.

A loss function reads a few columns of one split (tokens, the mask, and for a gate the
experts' cached log-probs) at the rows of one stratified minibatch per step. A `Source`
says where those rows live while it trains:

* resident (`stream=False`, the fastest while it fits): the columns go on the devices
  whole, once, and each step draws its indices from its key and gathers inside jit;
* streamed (`stream=True`): the columns stay on the host, in memory or on disk (memory
  maps, robust_gate.shards). For each chunk of S steps the host draws the same indices
  from the same keys, gathers their rows, and `train.fit` hands them to
  `primal_dual.run` as the chunk's `batches` [S, ...]; a background thread gathers the
  next chunk while the devices run this one (`Prefetch`, in chunk order).

The same indices: step t draws with fold_in(state.key, t), the dual player with
fold_in(that, 1) (`primal_dual.make_step`). The host evaluates `data.stratified_batch`
on those keys, vmapped, on its CPU (threefry is integer arithmetic and the draw one
exact float product, so every backend draws the same rows), and the loss runs the same
code on the rows: a streamed run is the resident run, bitwise on CPU
(tests/test_streaming.py). The data position is therefore the step every checkpoint
holds, and a resumed run streams on from it with no state of its own.

Across devices and hosts the rows of a step are split over the mesh along the batch
axis, as the resident path's indices are, and each process gathers only its own
devices' rows (`jax.make_array_from_callback`).

`choose` is the rule between the two: stream when what a resident source would put on
every device exceeds a budget in bytes.
"""

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from robust_gate import data as data_lib
from robust_gate import parallel, shards
from robust_gate.data import DomainData

Rows = dict[str, Any]  # column name -> the rows of one minibatch (or of S, stacked)
RowLoss = Callable[[Any, Rows], jax.Array]  # (params, rows) -> per-domain losses [K]
DUAL_FOLD = 1  # the dual player's key: fold_in(step key, 1), as primal_dual.make_step's


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """One split's rows as a loss function reads them, and where they live while it trains:
  on the devices (`stream` False) or on the host, in memory or memory-mapped (True)."""

  data: DomainData  # token arrays in memory, or memory-mapped (shards.open_split)
  cache: Any = None  # a gate's expert log-probs [N, T, M]: np.ndarray or shards.ShardedArray
  stream: bool = False

  def column(self, name: str):
    """ "inputs", "targets", "mask" (the split's [N, T] arrays) or "cache"."""
    if name != "cache":
      return getattr(self.data, f"{name}_NxT")
    if self.cache is None:
      raise ValueError("this loss reads the experts' cache: the Source holds none.")
    return self.cache


def device_bytes(data: DomainData, cache=None) -> int:
  """What a resident source of `data` (and `cache`) puts on every device."""
  arrays = [data.inputs_NxT, data.targets_NxT, data.mask_NxT] + ([] if cache is None else [cache])
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays)


def choose(data: DomainData, cache=None, *, budget_bytes: int | None) -> Source:
  """The rule: resident while `device_bytes` ≤ `budget_bytes` (None: always), else
  streamed."""
  stream = budget_bytes is not None and device_bytes(data, cache) > budget_bytes
  return Source(data, cache, stream)


def loss_fn(
  source: Source,
  per_domain: int,
  columns: tuple[str, ...],
  losses: RowLoss,
  axis: int,
  mesh: Mesh | None = None,
):
  """A per-domain loss function `(params, batch, key) -> [K]` that reads `columns` at a
  stratified minibatch of `per_domain` rows per domain and returns `losses(params, rows)`,
  the rows [K·B, ...] (axis 0) or [K, B, ...] (axis 1), split over the devices along
  that axis (given `mesh`, a data × model mesh of robust_gate.hf.sharding, over its data
  axis only). Resident: the minibatch is drawn from `key` inside jit (`batch` unused);
  streamed: a StreamedLoss, its rows in `batch`."""
  if source.stream:
    index = jax.device_put(data_lib.domain_index(source.data), _cpu())
    return StreamedLoss(source, per_domain, columns, losses, axis, index, mesh)
  arrays = {c: jnp.asarray(np.asarray(source.column(c))) for c in columns}
  index = data_lib.domain_index(source.data)

  def fn(params, batch, key):
    del batch
    idx = data_lib.stratified_batch(key, index, per_domain)
    idx = idx if axis else idx.reshape(-1)
    idx = parallel.shard_batch(idx, axis, mesh)
    return losses(params, {c: a[idx] for c, a in arrays.items()})

  return fn


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedLoss:
  """A loss function whose minibatch comes in its `batch`: the rows `rows` gathers for
  the indices `indices` draws."""

  source: Source
  per_domain: int
  columns: tuple[str, ...]
  losses: RowLoss
  axis: int  # the rows' batch axis: 0 (flat, [K·B, ...]) or 1 ([K, B, ...])
  index: data_lib.DomainIndex  # on the host's CPU device
  mesh: Mesh | None = None  # rows split over its data axis; None: over every device

  def __call__(self, params, batch, key):
    """In a streamed step `batch` is the step's rows. With a concrete `key` (outside
    jit, or closed over) it may be None: the rows of the minibatch `key` draws are
    gathered here (a loss evaluated at one key, as evaluate.gradient_conflict does)."""
    if batch is None:
      try:
        keys = np.asarray(key)[None]
      except jax.errors.TracerArrayConversionError:
        raise ValueError(
          "a streamed loss inside jit reads its rows from `batch` (train.fit gathers "
          "them); only outside jit may `batch` be None."
        ) from None
      with jax.ensure_compile_time_eval():  # concrete even where `params` are traced
        drawn = np.asarray(_draw(jax.device_put(keys, _cpu()), self.index, self.per_domain))
        batch = {c: x[0] for c, x in self.rows(drawn).items()}
    rows = {c: parallel.shard_batch(batch[c], self.axis, self.mesh) for c in self.columns}
    return self.losses(params, rows)

  def indices(self, base_key: np.ndarray, first: int, n: int, fold: int | None) -> np.ndarray:
    """[n, K, B]: the minibatches that steps first..first+n−1 of a game with key
    `base_key` draw (with `fold` DUAL_FOLD: its dual player's)."""
    cpu = _cpu()
    steps = jax.device_put(np.arange(first, first + n, dtype=np.int32), cpu)
    keys = _step_keys(jax.device_put(base_key, cpu), steps, fold)
    return np.asarray(_draw(keys, self.index, self.per_domain))

  def rows(self, idx_SxKxB: np.ndarray) -> Rows:
    """The rows of minibatches `idx_SxKxB` as global arrays [S, K·B, ...] (axis 0) or
    [S, K, B, ...] (axis 1), split over the devices along the batch axis; this process
    reads only the rows of its own devices' shards."""
    idx = idx_SxKxB.reshape(len(idx_SxKxB), -1) if self.axis == 0 else idx_SxKxB
    sharding = parallel.batch_sharding(idx.ndim, self.axis + 1, self.mesh)
    out = {}
    for c in self.columns:
      column = self.source.column(c)
      tail = tuple(column.shape[1:])

      def part(index, column=column, tail=tail):
        sub = idx[index[: idx.ndim]]  # this device's rows; its trailing axes are whole
        return shards.take(column, sub).reshape(sub.shape + tail)

      out[c] = jax.make_array_from_callback(idx.shape + tail, sharding, part)
    return out


@functools.partial(jax.jit, static_argnames="fold")
def _step_keys(base_key, steps_S, fold: int | None):
  keys = jax.vmap(lambda t: jax.random.fold_in(base_key, t))(steps_S)
  return keys if fold is None else jax.vmap(lambda k: jax.random.fold_in(k, fold))(keys)


@functools.partial(jax.jit, static_argnames="per_domain")
def _draw(keys_S, index: data_lib.DomainIndex, per_domain: int):
  return jax.vmap(lambda k: data_lib.stratified_batch(k, index, per_domain))(keys_S)


def _cpu() -> jax.Device:
  """Where the host draws indices: its own CPU, whatever the accelerator is doing."""
  return jax.local_devices(backend="cpu")[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Feed:
  """The host side of a streamed game: the rows of its primal's and its dual's
  minibatches, one chunk of steps at a time (None for a resident one)."""

  primal: StreamedLoss | None
  dual: StreamedLoss | None

  def batches(self, base_key: np.ndarray, first: int, n: int) -> dict:
    """{"primal", "dual"}: the rows of steps first..first+n−1, each [n, ...], or None."""
    out = {}
    for name, loss, fold in (("primal", self.primal, None), ("dual", self.dual, DUAL_FOLD)):
      out[name] = None if loss is None else loss.rows(loss.indices(base_key, first, n, fold))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedStep:
  """A game's step `(state, batch) -> (state, metrics)`, `batch` the rows `feed`
  gathers: what `train.make_game` builds when a loss is streamed, and `train.fit` runs."""

  fn: Callable
  feed: Feed

  def __call__(self, state, batch):
    return self.fn(state, batch)


def streamed_step(loss_fn, dual_on, make: Callable[[Any], Callable]) -> StreamedStep:
  """The step of a game with primal losses `loss_fn` and, if given, the dual's `dual_on`
  (either or both streamed). `make(dual_loss_fn)` builds the step (primal_dual.make_step
  with the game's players); it is called as the step is traced, so that the dual's
  losses can close over the step's rows."""

  def fn(state, batch):
    dual = None
    if dual_on is not None:
      dual = lambda params, key: dual_on(params, batch["dual"], key)
    return make(dual)(state, batch["primal"])

  streamed = lambda f: f if isinstance(f, StreamedLoss) else None
  return StreamedStep(fn, Feed(streamed(loss_fn), streamed(dual_on)))


def host_copy(x) -> np.ndarray:
  """A host copy of a replicated array (a game's key): the state it is in is donated."""
  return np.array(x.addressable_data(0) if isinstance(x, jax.Array) else x)


class Prefetch:
  """The batches of a run's chunks (first step, steps), in order: each gathered by one
  background thread while the chunk before it runs. A step that is not a StreamedStep
  takes None (it draws its own)."""

  def __init__(self, step_fn, key, chunks: Iterable[tuple[int, int]]):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    self._later: collections.deque[Callable[[], dict]] = collections.deque()
    if isinstance(step_fn, StreamedStep):
      host_key = host_copy(key)
      for first, n in chunks:
        self._later.append(functools.partial(step_fn.feed.batches, host_key, first, n))
    self._next = self._submit()

  def _submit(self) -> concurrent.futures.Future | None:
    return self._pool.submit(self._later.popleft()) if self._later else None

  def __next__(self):
    if self._next is None:
      return None
    batches = self._next.result()  # the thread's error, if any, is raised here
    self._next = self._submit()  # gathered while this chunk runs
    return batches

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
