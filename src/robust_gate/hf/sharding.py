"""Checkpoint experts bigger than a device: parameters split over a mesh's "model" axis.

The mesh is 2-D, data × model, over `jax.devices()`: each group of `model_parallel`
devices holds one copy of every expert's parameters between them, each device about
1/model_parallel of every matrix, and the batch is split over the data axis
(device count / model_parallel groups). `model_parallel` = 1 is robust_gate.parallel's
data parallelism (parameters whole on every device).

Which axis of a parameter is split is a rule, not a table per family (`param_spec`):
a matrix along its largest axis the model axis divides (embeddings along the
vocabulary or the width, projections along their wider side; the earlier axis on a
tie), never along the layers' stacking axis (the forward pass scans over it); vectors
(norms, biases) stay whole, a negligible part of the bytes that splitting would only
add collectives to.

The forward passes are the families' own code, unchanged: `score` jits them with the
parameters' shardings and the batch's as `in_shardings`, and XLA's GSPMD partitioner
inserts the collectives. The function computed is the same; only the order of float32
sums may differ (tests/test_hf_sharding.py: 1e-5 of one device's log-probs).

Why a scorer of its own: `experts.build_cache` splits every batch over every device,
which is what data parallelism wants and what a model larger than a device cannot
have (each device would need every parameter for its rows). `score` gives the same
[N, T, M] cache, masked and checked the same way.

Distillation keeps the teacher split too (`checkpoint_job.distill_student`): the
compiled step takes arrays already split over every device as they are, the others
whole on every device of the same mesh (robust_gate.closures), and its batch is split
over the data axis only (`distill.kl_loss_fn`'s `mesh`), as `score` splits its batches.
"""

import collections
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robust_gate import checks, parallel
from robust_gate.checks import InputError
from robust_gate.data import DomainData
from robust_gate.hf import model as model_lib

DATA, MODEL = "data", "model"


def mesh(model_parallel: int) -> Mesh:
  """Every device as a [device_count / model_parallel, model_parallel] grid, axes
  (data, model); devices that are neighbours in `jax.devices()` share a model."""
  n = jax.device_count()
  if isinstance(model_parallel, bool) or not isinstance(model_parallel, int):
    raise InputError(f"model_parallel must be an integer, got {model_parallel!r}.")
  if model_parallel < 1 or n % model_parallel:
    raise InputError(
      f"model_parallel={model_parallel} must be a positive divisor of the {n} devices."
    )
  devices = np.asarray(jax.devices()).reshape(n // model_parallel, model_parallel)
  return Mesh(devices, (DATA, MODEL))


def param_spec(shape: tuple[int, ...], model_size: int, stacked: bool) -> PartitionSpec:
  """Where one parameter of `shape` is split: along MODEL on its largest axis that
  `model_size` divides (the earlier on a tie), or nowhere (a vector, or no axis
  divides). `stacked`: axis 0 indexes layers and is never split."""
  first = 1 if stacked else 0
  axes = [a for a in range(first, len(shape)) if shape[a] % model_size == 0]
  if model_size == 1 or len(shape) - first < 2 or not axes:
    return PartitionSpec()
  axis = max(axes, key=lambda a: (shape[a], -a))
  return PartitionSpec(*(MODEL if a == axis else None for a in range(len(shape))))


def param_shardings(params: dict, mesh_: Mesh) -> dict:
  """A family's parameter tree (robust_gate.hf.checkpoint.read_params: top-level
  tensors, and "layers" stacked) as a tree of NamedShardings, by `param_spec`."""
  size = mesh_.shape[MODEL]
  on = lambda stacked: lambda a: NamedSharding(mesh_, param_spec(np.shape(a), size, stacked))
  top = {k: on(False)(v) for k, v in params.items() if k != "layers"}
  return {**top, "layers": jax.tree.map(on(True), params["layers"])}


def placer(mesh_: Mesh) -> model_lib.Place:
  """`hf.load`'s `place`: host parameters straight to their shards (each device is
  sent its own slice; no device holds a whole tensor on the way)."""
  return lambda params: jax.device_put(params, param_shardings(params, mesh_))


def shard_model(model: model_lib.Model, mesh_: Mesh) -> model_lib.Model:
  """`model` with its parameters split over `mesh_` (no copy where they already are)."""
  return jax.tree.map(jax.device_put, model, model_shardings(model, mesh_))


def model_shardings(model: model_lib.Model, mesh_: Mesh) -> model_lib.Model:
  """The Model pytree with a NamedSharding at each parameter: jit's `in_shardings`."""
  return model_lib.Model(
    param_shardings(model.params, mesh_), model.family, model.config, model.tokenizer, model.path
  )


def device_bytes(tree) -> dict[int, int]:
  """Bytes of `tree`'s arrays that each device holds, by device id (a replicated
  array counts whole on every device)."""
  held: collections.Counter = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      held[s.device.id] += s.data.nbytes
  return dict(held)


def _group_logprobs(models: tuple[model_lib.Model, ...], x_BxT, y_BxT) -> jax.Array:
  return jnp.stack([model_lib.token_logprobs(m, x_BxT, y_BxT) for m in models], axis=-1)


def score(
  named: Mapping[str, model_lib.Model], data: DomainData, mesh_: Mesh, batch_size: int = 512
) -> np.ndarray:
  """log p_j(target_t | x_≤t) of every model on every example, [N, T, M] float32 (one
  column per name, in order): `experts.build_cache` of `hf.expert_group(named)`, with
  each model's parameters split over `mesh_`'s model axis and every batch of
  `batch_size` rows (rounded up to the data axis) over its data axis."""
  models = tuple(shard_model(m, mesh_) for m in named.values())
  if not models:
    raise InputError("no experts given (M = 0).")
  widths = [m.config.vocab_size for m in models]
  if set(widths) != {data.vocab_size}:
    raise InputError(
      f"experts {list(named)} have output widths {widths}; the data has vocabulary "
      f"size {data.vocab_size}."
    )
  rows = NamedSharding(mesh_, PartitionSpec(DATA))
  shardings = tuple(model_shardings(m, mesh_) for m in models)
  fn = jax.jit(_group_logprobs, in_shardings=(shardings, rows, rows), out_shardings=rows)
  N, _ = data.inputs_NxT.shape
  B = min(batch_size, N)
  B += -B % mesh_.shape[DATA]
  calls = -(-N // B)
  pad = ((0, calls * B - N), (0, 0))  # one compiled shape: pad the last batch
  inputs, targets = np.pad(data.inputs_NxT, pad), np.pad(data.targets_NxT, pad)
  # Dispatched back to back, copied to the host at the end (as build_cache does).
  outs = [
    fn(models, inputs[i * B : (i + 1) * B], targets[i * B : (i + 1) * B]) for i in range(calls)
  ]
  cache = np.concatenate([parallel.fetch(o) for o in outs])[:N]
  cache = np.where(data.mask_NxT[..., None], cache, 0.0).astype(np.float32)
  checks.check_token_logprobs(cache, data.mask_NxT, name="expert cache")
  return cache
