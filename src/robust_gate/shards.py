"""Arrays larger than memory: on disk in row shards, read by row through memory maps.

    <dir>/manifest.json    fingerprint, shape, dtype, rows per shard, the SHA-1 of every
                           shard written
    <dir>/shard_00000.npy  rows [0, R), then [R, 2R), ... (`.npy`: a header and the rows)

`build` computes the shards one at a time, writes each atomically and only then records
its digest in the manifest (itself replaced atomically): a run killed midway leaves
whole shards and a manifest that names only whole ones. Run again, it keeps every shard
whose file matches its digest and computes the rest, those never written and those
damaged since (each announced). A directory built for another fingerprint (other data,
other experts) is refused and left as it is. Each shard is computed by every process
(the scoring programs span every device), written by process 0.

`ShardedArray` reads rows by index (`take`) through the shards' memory maps, in stored
order so that a disk reads forward, and selects rows or last-axis entries lazily
(`a[idx]`, `a[..., j]`): a subset of a cache stays on disk. `np.asarray(a)` reads it.

`write_split` / `open_split` keep a split's tokens on disk the same way (one shard per
column, so each column is one memory-mapped `.npy` and the DomainData is an ordinary
one; `write_split_blocks` writes it from blocks of sequences, never holding it whole):
random access to any row at memory-copy speed, deterministic, no decoding. The prepared
TFDS array_record files also give random access, but decode a serialized example in
Python and encode it to a row on every read, slower than a training step.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from robust_gate import files, parallel
from robust_gate.checks import InputError
from robust_gate.data import DomainData

MANIFEST = "manifest.json"
SHARD_BYTES = 64 << 20  # a shard's size by default: written whole, digested on open
_SHARD = re.compile(r"shard_(\d{5,})\.npy")
_LAYOUT = ("fingerprint", "shape", "dtype", "shard_rows")


def rows_per_shard(row_bytes: int, shard_bytes: int = SHARD_BYTES) -> int:
  return max(1, shard_bytes // max(1, row_bytes))


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedArray:
  """An [N, ...] array stored in row shards; `rows_N` and `last` select lazily."""

  maps: tuple[np.ndarray, ...]  # every shard's rows, memory-mapped, in row order
  shard_rows: int  # rows per shard (the last may hold fewer)
  rows_N: np.ndarray | None = None  # the stored rows this array is, in order; None: all
  last: Any = None  # an index into the last axis, applied to every row; None: all of it

  @property
  def shape(self) -> tuple[int, ...]:
    n = sum(len(m) for m in self.maps) if self.rows_N is None else len(self.rows_N)
    rest = self.maps[0].shape[1:]
    if self.last is not None:
      rest = rest[:-1] + np.arange(rest[-1])[self.last].shape
    return (n, *rest)

  @property
  def dtype(self) -> np.dtype:
    return self.maps[0].dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def take(self, rows) -> np.ndarray:
    """The rows `rows` (any order, repeats allowed) as one in-memory array."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    n = len(self)
    if rows.size and (rows.min() < -n or rows.max() >= n):
      raise IndexError(f"row index out of range for {n} rows.")
    rows = np.where(rows < 0, rows + n, rows)
    stored = rows if self.rows_N is None else self.rows_N[rows]
    order = np.argsort(stored, kind="stable")
    sorted_rows = stored[order]
    bounds = np.searchsorted(sorted_rows // self.shard_rows, np.arange(len(self.maps) + 1))
    out = np.empty((len(rows), *self.maps[0].shape[1:]), self.dtype)
    for i in np.flatnonzero(bounds[1:] > bounds[:-1]):  # the shards these rows are in
      lo, hi = bounds[i], bounds[i + 1]
      out[order[lo:hi]] = self.maps[i][sorted_rows[lo:hi] - i * self.shard_rows]
    return out if self.last is None else out[..., self.last]

  def __getitem__(self, key):
    """Rows (a slice, integer or boolean array) and last-axis entries (`a[..., j]`)
    select lazily; any other index reads the array and applies it."""
    if isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis:
      entries = np.arange(self.maps[0].shape[-1])
      entries = entries if self.last is None else entries[self.last]
      if entries.ndim == 1:
        return dataclasses.replace(self, last=entries[key[1]])
    elif isinstance(key, slice) or (not isinstance(key, tuple) and np.ndim(key) == 1):
      rows = np.arange(len(self))[key]
      return dataclasses.replace(self, rows_N=rows if self.rows_N is None else self.rows_N[rows])
    return np.asarray(self)[key]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.empty(self.shape, self.dtype)
    for lo in range(0, len(self), self.shard_rows):  # a shard's worth of rows at a time
      out[lo : lo + self.shard_rows] = self.take(
        np.arange(lo, min(len(self), lo + self.shard_rows))
      )
    return out if dtype is None else out.astype(dtype)


# Rows are gathered in blocks by several threads (numpy copies without the GIL): one
# thread moved 3.4 GB/s on an H200's host, 16 threads 14 GB/s (docs/performance.md).
_GATHER = concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1), "gather")
_BLOCK_BYTES = 4 << 20  # the least a thread is handed


def take(array, rows) -> np.ndarray:
  """array[rows] of an in-memory array, a memory map (read in stored order) or a
  ShardedArray, gathered in blocks by several threads when it is large."""
  rows = np.asarray(rows, np.int64).reshape(-1)
  n = array.shape[0]
  if rows.size and (rows.min() < -n or rows.max() >= n):
    raise IndexError(f"row index out of range for {n} rows.")
  rows = np.where(rows < 0, rows + n, rows)
  row_bytes = int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
  blocks = max(1, min(_GATHER._max_workers, len(rows) * row_bytes // _BLOCK_BYTES))
  empty = _take(array, rows[:0], None)  # the rows' shape and dtype (a selection drops axes)
  out = np.empty((len(rows), *empty.shape[1:]), empty.dtype)
  bounds = np.linspace(0, len(rows), blocks + 1).astype(int)
  fill = lambda i: _take(array, rows[bounds[i] : bounds[i + 1]], out[bounds[i] : bounds[i + 1]])
  list(_GATHER.map(fill, range(blocks)))  # list(): a thread's error is raised here
  return out


def _take(array, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
  """array[rows] (valid, non-negative) written into `out` if given."""
  if isinstance(array, ShardedArray):
    got = array.take(rows)
  elif isinstance(array, np.memmap):  # read in stored order: a disk reads forward
    order = np.argsort(rows, kind="stable")
    got = np.empty((len(rows), *array.shape[1:]), array.dtype)
    got[order] = array[rows[order]]
  elif isinstance(array, np.ndarray) and out is not None:  # "clip": unbuffered ("raise" is)
    return np.take(array, rows, axis=0, out=out, mode="clip")
  else:
    got = np.asarray(array[rows])
  if out is not None:
    out[...] = got
  return got


def build(
  directory: str,
  *,
  fingerprint: str,
  shape: tuple[int, ...],
  dtype,
  shard_rows: int,
  compute: Callable[[int, int], np.ndarray] | None,
  log: Callable[[str], None] = print,
  name: str | None = None,
) -> ShardedArray:
  """The array in `directory`, computing (rows lo..hi−1 = `compute(lo, hi)`) the shards
  it lacks or that are damaged; with `compute` None a shard to compute is an InputError.

  Raises:
    InputError: `directory` holds an array of another fingerprint (left as it is).
  """
  name = name or directory
  layout = {
    "fingerprint": fingerprint,
    "shape": list(shape),
    "dtype": np.dtype(dtype).name,
    "shard_rows": shard_rows,
  }
  count = -(-shape[0] // shard_rows)
  parallel.sync(f"shards {directory}")  # written before any process reads it
  kept = _kept(directory, layout, count, log, name)
  parallel.sync(f"shards read {directory}")  # every process decided before any rewrite
  todo = [i for i in range(count) if i not in kept]
  if todo and compute is None:
    raise InputError(
      f"{name}: {len(todo)} of its {count} shards are missing or damaged and cannot be "
      f"computed here; write it again from its source."
    )
  if kept and todo:
    log(f"{name}: keeping {len(kept)} of its {count} shards; computing the other {len(todo)}.")
  if todo and parallel.is_main():
    os.makedirs(directory, exist_ok=True)
  for i in todo:
    assert compute is not None
    lo, hi = i * shard_rows, min(shape[0], (i + 1) * shard_rows)
    block = np.asarray(compute(lo, hi))
    if block.shape != (hi - lo, *shape[1:]) or block.dtype != np.dtype(dtype):
      raise ValueError(f"{name}: rows {lo}–{hi - 1} computed as {block.shape} {block.dtype}.")
    buffer = io.BytesIO()
    np.save(buffer, block)
    files.atomic_write(_shard_path(directory, i), buffer.getvalue())
    kept[i] = hashlib.sha1(buffer.getvalue()).hexdigest()
    files.write_json(os.path.join(directory, MANIFEST), {**layout, "shards": _named(kept)})
  if todo and parallel.is_main():
    for f in os.listdir(directory):  # shards of an older layout
      if (m := _SHARD.fullmatch(f)) and int(m.group(1)) >= count:
        os.remove(os.path.join(directory, f))
  parallel.sync(f"shards written {directory}")
  return ShardedArray(tuple(_map(directory, i) for i in range(count)), shard_rows)


def open_array(directory: str, log: Callable[[str], None] = print) -> ShardedArray:
  """An array `build` wrote, every shard checked against its digest (none computed)."""
  stored = _manifest(os.path.join(directory, MANIFEST))
  if stored is None:
    raise InputError(f"{directory} holds no complete array (its {MANIFEST} is missing or damaged).")
  return build(
    directory,
    fingerprint=stored["fingerprint"],
    shape=tuple(stored["shape"]),
    dtype=stored["dtype"],
    shard_rows=stored["shard_rows"],
    compute=None,
    log=log,
  )


def _named(digests: dict[int, str]) -> dict[str, str]:
  return {str(i): digests[i] for i in sorted(digests)}


def _shard_path(directory: str, i: int) -> str:
  return os.path.join(directory, f"shard_{i:05d}.npy")


def _map(directory: str, i: int) -> np.ndarray:
  return np.load(_shard_path(directory, i), mmap_mode="r")


def _manifest(path: str) -> dict | None:
  """The manifest at `path`, or None when it is missing or does not parse as one."""
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError):  # missing, unreadable, or not JSON (UnicodeDecodeError too)
    return None
  keys_ok = isinstance(stored, dict) and all(k in stored for k in (*_LAYOUT, "shards"))
  return stored if keys_ok and isinstance(stored["shards"], dict) else None


def _kept(directory: str, layout: dict, count: int, log, name: str) -> dict[int, str]:
  """{shard: digest} of the shards in `directory` that match `layout` and their digests;
  the damaged ones announced."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return {}
  stored = _manifest(path)
  if stored is None:
    log(f"{name}: {path} is damaged (not a shard manifest); computing every shard again.")
    return {}
  if stored["fingerprint"] != layout["fingerprint"]:
    raise InputError(
      f"{directory} was built for other data or other experts (fingerprint "
      f"{str(stored['fingerprint'])[:12]}…, expected {layout['fingerprint'][:12]}…, shape "
      f"{stored['shape']}); delete it or use another workdir."
    )
  if {k: stored[k] for k in _LAYOUT} != layout:
    diff = ", ".join(
      f"{k} {stored[k]} (now {layout[k]})" for k in _LAYOUT if stored[k] != layout[k]
    )
    log(f"{name}: {path} describes another layout ({diff}); computing every shard again.")
    return {}
  kept = {}
  rows, dtype = layout["shard_rows"], np.dtype(layout["dtype"])
  for key, digest in stored["shards"].items():
    i = int(key) if str(key).isdigit() else -1
    if not 0 <= i < count:
      continue
    lo, hi = i * rows, min(layout["shape"][0], (i + 1) * rows)
    problem = _problem(_shard_path(directory, i), digest, (hi - lo, *layout["shape"][1:]), dtype)
    if problem:
      log(f"{name}: shard {i} (rows {lo}–{hi - 1}) is damaged ({problem}); rebuilding it.")
    else:
      kept[i] = digest
  return kept


def _problem(path: str, digest: str, shape: tuple, dtype: np.dtype) -> str:
  """What is wrong with the shard file at `path` ("" if nothing)."""
  h = hashlib.sha1()
  try:
    with open(path, "rb") as f:
      while block := f.read(16 << 20):
        h.update(block)
    if h.hexdigest() != digest:
      return f"its SHA-1 {h.hexdigest()[:12]}… is not the manifest's {str(digest)[:12]}…"
    m = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    return f"{type(e).__name__}: {e}"
  if m.shape != shape or m.dtype != dtype:
    return f"holds {m.shape} {m.dtype}, expected {shape} {dtype}"
  return ""


# ------------------------------------------------------------- a split on disk

_COLUMNS = ("inputs_NxT", "targets_NxT", "mask_NxT", "domain_N")


def write_split(directory: str, d: DomainData, log: Callable[[str], None] = print) -> DomainData:
  """Writes `d` under `directory` once (a complete copy is kept) and returns it
  memory-mapped (`open_split`). Every process calls it; process 0 writes."""
  if parallel.is_main():
    write_split_blocks(directory, [d], len(d.domain_N))
  parallel.sync(f"split written {directory}")
  return open_split(directory, log)


def write_split_blocks(directory: str, blocks: Iterable[DomainData], rows: int) -> None:
  """Writes a split of `rows` sequences under `directory` from its blocks, in order (each
  a DomainData of the same domains, vocabulary and length), holding one block in memory
  at a time: each column is filled in a staging file, then digested and moved into
  place with its manifest. The files and fingerprint are those of the whole split
  written at once. Process 0 only (the caller syncs; `open_split` reads it back)."""
  staging = f"{directory}.writing"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  maps: dict[str, np.memmap] = {}
  first, lo = None, 0
  for block in blocks:
    n = len(block.domain_N)
    if first is None:
      first = block
      for c in _COLUMNS:
        a = getattr(block, c)
        path = os.path.join(staging, f"{c}.npy")
        maps[c] = np.lib.format.open_memmap(path, "w+", a.dtype, (rows, *a.shape[1:]))
    elif (tuple(block.domains), block.vocab_size) != (tuple(first.domains), first.vocab_size):
      raise ValueError(f"{directory}: a block of other domains or another vocabulary.")
    if lo + n > rows:
      raise ValueError(f"{directory}: its blocks hold more than the {rows} rows given.")
    for c in _COLUMNS:
      maps[c][lo : lo + n] = getattr(block, c)
    lo += n
  if first is None or lo != rows:
    raise ValueError(f"{directory}: its blocks hold {lo} rows, not the {rows} given.")
  h = hashlib.sha1()  # DomainData.fingerprint, read back a shard's worth of rows at a time
  for c in _COLUMNS:
    maps[c].flush()
    step = rows_per_shard(maps[c][:1].nbytes)
    for r in range(0, rows, step):
      h.update(np.ascontiguousarray(maps[c][r : r + step]).tobytes())
  domains, vocab_size = tuple(first.domains), first.vocab_size
  h.update(repr((domains, vocab_size)).encode())
  fingerprint = h.hexdigest()
  shapes = {c: (m.shape, m.dtype) for c, m in maps.items()}
  maps.clear()  # the staging files' memory maps closed before they are moved
  for c in _COLUMNS:
    _adopt(os.path.join(directory, c), os.path.join(staging, f"{c}.npy"), fingerprint, *shapes[c])
  meta = {"fingerprint": fingerprint, "domains": list(domains), "vocab_size": vocab_size}
  files.write_json(os.path.join(directory, "split.json"), meta)
  shutil.rmtree(staging)


def _adopt(directory: str, npy: str, fingerprint: str, shape: tuple, dtype: np.dtype) -> None:
  """Moves the finished `.npy` file `npy` into `directory` as its one shard, then writes
  the manifest `build` would have (its digest read back from the file)."""
  h = hashlib.sha1()
  with open(npy, "rb") as f:
    while block := f.read(16 << 20):
      h.update(block)
    os.fsync(f.fileno())
  os.makedirs(directory, exist_ok=True)
  for old in os.listdir(directory):  # shards of an older layout
    if _SHARD.fullmatch(old):
      os.remove(os.path.join(directory, old))
  os.replace(npy, _shard_path(directory, 0))
  layout = {
    "fingerprint": fingerprint,
    "shape": list(shape),
    "dtype": np.dtype(dtype).name,
    "shard_rows": shape[0],
  }
  files.write_json(os.path.join(directory, MANIFEST), {**layout, "shards": {"0": h.hexdigest()}})


def open_split(directory: str, log: Callable[[str], None] = print) -> DomainData:
  """The split `write_split` wrote, its token arrays memory-mapped (domain labels in
  memory), every file checked against its digest; a damaged one is an InputError."""
  path = os.path.join(directory, "split.json")
  try:
    with open(path) as f:
      meta = json.load(f)
    domains, vocab_size, fingerprint = meta["domains"], meta["vocab_size"], meta["fingerprint"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path} cannot be read ({type(e).__name__}); write the split again.") from e
  arrays = {}
  for column in _COLUMNS:
    stored = _manifest(os.path.join(directory, column, MANIFEST))
    if stored is not None and stored["fingerprint"] != fingerprint:
      raise InputError(f"{directory}/{column} belongs to another split; write the split again.")
    arrays[column] = open_array(os.path.join(directory, column), log).maps[0]
  arrays["domain_N"] = np.array(arrays["domain_N"])  # small, and counted often
  return DomainData(**arrays, domains=tuple(domains), vocab_size=vocab_size)
