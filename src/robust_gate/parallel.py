"""Data parallelism over every device: batches split, parameters replicated.

One mechanism for every phase: `jit` with shardings (GSPMD). A 1-D mesh named
"data" spans `jax.devices()` (all local devices; after `jax.distributed.initialize`
every device of every process). Inside the compiled step, the minibatch indices
drawn from the step's key are constrained to be split along their batch axis
(`shard_batch`); XLA then partitions the forward and backward passes by batch,
keeps parameters, optimizer state and λ replicated, and all-reduces the
per-domain loss sums and the gradients, so λ is the same number on every device.
Outside the step, arrays scored in batches (the expert caches, evaluation) are
placed split by rows (`put_rows`).

Why not `pmap` or `shard_map`: the step functions stay the single-device code
(no per-device reshaping, no explicit `psum`, no device axis in the state), and
the device count changes only how XLA partitions, not what is computed.

Across hosts: after `jax.distributed.initialize` (the launchers' --coordinator_address,
--num_processes, --process_id flags; robust_gate.cli) every process runs the same
program on the same host data (datasets and keys are deterministic), puts only
its own devices' shards (`put`), and gathers what it reads back (`fetch`). Files
are written by process 0 alone (`is_main`); `sync` is a barrier across processes.

Batch sizes in configs are global (`per_domain` sequences per domain per step,
summed over devices); they must divide by the device count (`check_divisible`).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robust_gate.checks import InputError

AXIS = "data"


def mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def check_divisible(n: int, what: str) -> None:
  """A global batch must split evenly over the devices: a clear error otherwise."""
  d = jax.device_count()
  if n % d:
    raise InputError(
      f"{what}={n} does not divide across the {d} devices; use a "
      f"multiple of {d} (batch sizes are global, split over devices)."
    )


def _spec(ndim: int, axis: int) -> PartitionSpec:
  return PartitionSpec(*([None] * axis + [AXIS] + [None] * (ndim - axis - 1)))


def shard_batch(x: jax.Array, axis: int = 0, over: Mesh | None = None) -> jax.Array:
  """Inside jit: `x` split over the devices along `axis` (a no-op on one device); given
  `over`, a mesh with an AXIS axis among others, over that axis only."""
  return jax.lax.with_sharding_constraint(x, batch_sharding(x.ndim, axis, over))


def batch_sharding(ndim: int, axis: int, over: Mesh | None = None) -> NamedSharding:
  """An [..., B, ...] array (B at `axis`) split along B over AXIS of `over` (default:
  `mesh()`, every device)."""
  return NamedSharding(mesh() if over is None else over, _spec(ndim, axis))


def replicate(tree):
  """A pytree placed whole on every device (parameters, optimizer state, λ)."""
  return jax.device_put(tree, NamedSharding(mesh(), PartitionSpec()))


def put(array, axis: int = 0) -> jax.Array:
  """A host array → a device array split over the devices along `axis`."""
  array = np.asarray(array)
  return jax.device_put(array, NamedSharding(mesh(), _spec(array.ndim, axis)))


def put_rows(*arrays):
  """Host arrays → device arrays split by rows, padded to a multiple of the devices.

  Returns (device_arrays, n): the padded arrays and the original row count.
  """
  n = len(arrays[0])
  pad = -n % jax.device_count()
  return [put(np.pad(np.asarray(a), [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1))) for a in arrays], n


def fetch(x) -> np.ndarray:
  """A device array → the whole array on the host (gathered across processes)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main() -> bool:
  """True on the process that writes files and prints progress (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
