"""Checkpoints that resume, and per-step metrics, for every training phase.

A training phase owns one directory:

    <dir>/spec.json        what the phase was started with (config and input digests)
    <dir>/checkpoints/<s>/ orbax checkpoints of the whole GameState at step s
                           (params, optimizer, λ, λ̄, PRNG key: the key and the step
                           are the data position, since batches are drawn from them)
    <dir>/metrics.jsonl    one JSON line per step: losses, λ, objective, grad norm

Writes are atomic: orbax commits a checkpoint by renaming a finished temporary
directory; spec.json is replaced whole (`files.atomic_write`); metric lines are appended one
chunk per write and a torn last line is dropped on resume. Every checkpoint
carries a digest of its arrays: a checkpoint that fails to restore or whose
digest differs is reported, moved to <dir>/corrupt/, and the previous one used.

Resuming restarts at a checkpoint on a chunk boundary, so the resumed run
executes the same compiled chunks on the same state as an uninterrupted one
(bitwise equal on CPU; tests/test_checkpoints.py).
"""

import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from robust_gate import experts, parallel
from robust_gate.checks import InputError
from robust_gate.files import atomic_write


def _plain(obj):
  """JSON-comparable form of a spec (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(obj, default=lambda x: np.asarray(x).tolist()))


class Checkpointer:
  """One phase directory: spec check, restore with fallback, save, metrics."""

  def __init__(
    self,
    directory: str,
    spec: dict,
    *,
    name: str,
    log=print,
    max_to_keep: int = 2,
    create: bool = True,
  ):
    """Opens (with create=False: only if it exists) the phase directory.

    Raises InputError when the directory's saved spec differs from `spec`, and
    with create=False when the phase has never been started there.
    """
    self.directory, self.name, self.log = directory, name, log
    path = os.path.join(directory, "spec.json")
    if not os.path.exists(path):
      if not create:
        raise InputError(
          f"{name}: nothing trained in {directory}; run its phase "
          f"first (or launch/main.py, which runs every phase)."
        )
      if parallel.is_main():
        os.makedirs(directory, exist_ok=True)
      atomic_write(path, json.dumps(_plain(spec), indent=1, sort_keys=True))
    parallel.sync(f"spec {directory}")  # written before any process reads it
    self._check_spec(path, _plain(spec))
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _check_spec(self, path: str, spec: dict) -> None:
    with open(path) as f:
      stored = json.load(f)
    if stored != spec:
      keys = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
      diffs = "; ".join(f"{k}: saved {stored.get(k)!r}, now {spec.get(k)!r}" for k in keys)
      raise InputError(
        f"{self.directory} holds a {self.name} run started with a different "
        f"configuration or inputs ({diffs}). Refusing to mix them: use another "
        f"--workdir, or delete {self.directory} to start this phase again."
      )

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      os.path.join(self.directory, "checkpoints"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, enable_async_checkpointing=False
      ),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, like, step: int | None = None):
    """The newest good checkpoint (or the one at `step`) shaped like `like`.

    Returns None when there is none. Corrupt checkpoints are reported and moved
    aside; the previous good one is used.
    """
    for s in reversed(self.steps()):
      if step is not None and s != step:
        continue
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
      try:
        restored = self._manager.restore(
          s,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
          ),
        )
        digest = experts.params_fingerprint(restored.state)
        if digest != restored.meta["digest"]:
          raise ValueError(f"digest {digest[:12]}… != saved {restored.meta['digest'][:12]}…")
      except Exception as e:
        self._quarantine(s, e)
        continue
      return restored.state
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    corrupt = os.path.join(self.directory, "corrupt")
    dest = os.path.join(corrupt, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    parallel.sync(f"quarantine {self.directory} {step}")  # every process has read it
    if parallel.is_main():
      os.makedirs(corrupt, exist_ok=True)
      shutil.move(os.path.join(self.directory, "checkpoints", str(step)), dest)
    parallel.sync(f"quarantined {self.directory} {step}")
    self.log(
      f"{self.name}: checkpoint at step {step} is corrupt "
      f"({type(error).__name__}: {str(error)[:200]}); moved to {dest}, "
      f"using the previous one."
    )
    self._manager = self._open()

  def save(self, state, metrics: dict) -> None:
    """Appends the chunk's metric lines, then commits the checkpoint."""
    step = int(state.step)
    first = step - len(metrics["losses"]) + 1
    lines = "".join(
      json.dumps({"step": first + i, **{k: np.asarray(v[i]).tolist() for k, v in metrics.items()}})
      + "\n"
      for i in range(len(metrics["losses"]))
    )
    if parallel.is_main():
      with open(self.metrics_path, "a") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"digest": experts.params_fingerprint(state), "step": step}),
      ),
    )
    self._manager.wait_until_finished()

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.directory, "metrics.jsonl")

  def metrics(self, up_to: int) -> list[dict]:
    """Metric rows of steps 1..up_to; later or torn lines are dropped from the file."""
    return read_metrics(self.directory, up_to, truncate=True)


def read_metrics(directory: str, up_to: int | None = None, *, truncate: bool = False) -> list[dict]:
  """The metric rows of a phase directory (steps ≤ up_to), in step order."""
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows, dropped = {}, False
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a torn last line from a killed write
        dropped = True
        continue
      if up_to is not None and row["step"] > up_to:
        dropped = True
        continue
      rows[row["step"]] = row
  ordered = [rows[s] for s in sorted(rows)]
  if truncate and dropped:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in ordered))
  return ordered


def stack_metrics(rows: list[dict]) -> dict:
  """Rows → {name: array over steps}."""
  if not rows:
    return {}
  return {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k != "step"}
