"""The arrays a function closes over, made arguments of the program XLA compiles.

A loss function here closes over its split's tokens, a gate's over the experts' cache,
the student's over the frozen experts' parameters. Under `jax.jit`, arrays a function
closes over are compiled into the program as constants: the program text holds every
byte, and compiling it takes time in proportion (a jitted function closing over 128 MB
compiled in 15.6 s on the 2-core CPU, the same function taking the array as an
argument in 0.14 s; BUILD_NOTES.md). `hoist` traces a function once and returns it as
a function of (those arrays, its arguments), so callers pass them to the compiled
program as arguments: the same computation, compiled once per shape.

Where the arguments are placed (`_place`): whole on every device of
`parallel.mesh()`, data parallelism's placement, unless one of them is already split
over every device, as a checkpoint teacher's parameters are over the model axis of
robust_gate.hf.sharding's data × model mesh. Such an array is passed as it is (the
point of splitting it: gathering it whole might not fit on a device), and the others
are placed whole on every device of its mesh, so that every argument of the program
lives on one mesh: jit accepts arguments on different meshes of the same devices, but
it names the shardings XLA chooses for the outputs on the first argument's mesh, and
fails where that mesh cannot express them (a 1-D mesh of 8 devices cannot name an
output split 4 ways along a data × model mesh's model axis).
"""

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robust_gate import parallel


@dataclasses.dataclass(frozen=True, eq=False)
class Hoisted:
  """`fn` as a function of (consts, *args): `consts` the arrays it closed over, in
  the order `hoist` returned them. Hashable by identity: a static jit argument."""

  jaxpr: Any  # the traced function (jax.core.Jaxpr), its constants as leading inputs
  in_tree: Any
  out_tree: Any

  def __call__(self, consts, *args):
    flat, tree = jax.tree_util.tree_flatten(args)
    if tree != self.in_tree:
      raise ValueError(
        f"arguments of structure {tree}; the function was traced with {self.in_tree}."
      )
    out = jax.core.eval_jaxpr(self.jaxpr, list(consts), *flat)
    return jax.tree_util.tree_unflatten(self.out_tree, out)


# fn -> {the arguments' shapes and structure: (Hoisted, consts)}; an entry lives as
# long as its function (the step of a game, the scorer of a group of experts).
_TRACED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def hoist(fn: Callable, *args) -> tuple[Hoisted, list]:
  """(Hoisted, consts): `fn` traced at the shapes and dtypes of `args` (arrays or
  jax.ShapeDtypeStruct), the arrays it closes over hoisted into `consts`, such that
  `hoisted(consts, *args) == fn(*args)`. Traced once per function and shapes."""
  flat, in_tree = jax.tree_util.tree_flatten(args)
  key = (in_tree, tuple((tuple(x.shape), str(x.dtype)) for x in flat))
  per_fn = _TRACED.setdefault(fn, {})
  if key not in per_fn:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_tree = jax.tree_util.tree_structure(out_shape)
    consts = _place(closed.consts)
    per_fn[key] = (Hoisted(closed.jaxpr, in_tree, out_tree), consts)
  return per_fn[key]


def _place(consts: list) -> list:
  """`consts` on one mesh: those already split over every device as they are, the
  others whole on every device of their mesh (`parallel.mesh()` when none is split)."""
  meshes = {c.sharding.mesh for c in consts if _split_everywhere(c)}
  if len(meshes) > 1:
    raise ValueError(f"closed-over arrays split over {len(meshes)} different meshes: {meshes}.")
  mesh = meshes.pop() if meshes else parallel.mesh()
  return [c if _split_everywhere(c) else _everywhere(c, mesh) for c in consts]


def _split_everywhere(x) -> bool:
  """`x` is a jax.Array split over a mesh of every device (not whole on each)."""
  return (
    isinstance(x, jax.Array)
    and isinstance(x.sharding, NamedSharding)
    and x.sharding.device_set == set(jax.devices())
    and not x.sharding.is_fully_replicated
  )


def _everywhere(x, mesh: Mesh):
  """`x` whole on every device of `mesh`, as the compiled program's arguments must
  be; an array already there is kept as it is (no copy), one whole on every device of
  another mesh only relabelled with `mesh`."""
  target = NamedSharding(mesh, PartitionSpec())
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
    other = isinstance(x.sharding, NamedSharding) and x.sharding.mesh != mesh
    return jax.device_put(x, target) if other else x
  return jax.device_put(np.asarray(x), target)
