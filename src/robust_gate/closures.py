"""The arrays a function closes over, made arguments of the program XLA compiles.

A loss function here closes over its split's tokens, a gate's over the experts' cache,
the student's over the frozen experts' parameters. Under `jax.jit`, arrays a function
closes over are compiled into the program as constants: the program text holds every
byte, and compiling it takes time in proportion (a jitted function closing over 128 MB
compiled in 15.6 s on the 2-core CPU, the same function taking the array as an
argument in 0.14 s; BUILD_NOTES.md). `hoist` traces a function once and returns it as
a function of (those arrays, its arguments), so callers pass them to the compiled
program as arguments: the same computation, compiled once per shape.
"""

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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
    consts = [_everywhere(c) for c in closed.consts]
    per_fn[key] = (Hoisted(closed.jaxpr, in_tree, out_tree), consts)
  return per_fn[key]


def _everywhere(x):
  """`x` whole on every device of the mesh, as the compiled program's arguments must
  be; an array already there is kept as it is (no copy)."""
  target = NamedSharding(parallel.mesh(), PartitionSpec())
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
    return x
  return jax.device_put(np.asarray(x), target)
