"""Checkpoints that resume, and per-step metrics, for every training phase.

A training phase owns one directory:

    <dir>/spec.json        what the phase was started with (config and input digests)
    <dir>/checkpoints/<s>/ orbax checkpoints of the whole GameState at step s
                           (params, optimizer, λ, λ̄, PRNG key: the key and the step
                           are the data position, since batches are drawn from them)
    <dir>/metrics.jsonl    one JSON line per step: losses, λ, objective, grad norm
    <dir>/corrupt/         checkpoints found damaged, moved aside

Writes are atomic: orbax commits a checkpoint by renaming a finished temporary
directory; spec.json is replaced whole (`files.atomic_write`); metric lines are
appended one chunk per write, and a line cut short is dropped (announced). Every
checkpoint carries a digest of its arrays: one with evidence of damage (a digest that
differs, a file missing or that does not decode) is reported, moved to <dir>/corrupt/,
and the previous one used. Any other failure moves nothing: a state of another
structure than the code's is one line, and memory exhausted or an I/O error propagates.

Which checkpoints stay: the final checkpoint of every run that finished (its last
step, `save(final=True)`), so a phase asked for fewer steps than a later run went
restores the one it asked for; and, of the others, the newest two below the step
just saved, so a damaged newest one falls back to the one before. Older ones go.

Nothing read is trusted unseen: a spec.json that does not parse, or checkpoints
without one, is refused with the file named; `metrics(state)` checks that the file
holds a row for every step up to the state's, announces the steps it lacks, and
rebuilds them when a replay of the run reproduces the state's digest.

Resuming restarts at a checkpoint on a chunk boundary, so the resumed run
executes the same compiled chunks on the same state as an uninterrupted one
(bitwise equal on CPU; tests/test_checkpoints.py).
"""

import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from robust_gate import experts, parallel
from robust_gate.checks import InputError
from robust_gate.files import atomic_write


def _plain(obj):
  """JSON-comparable form of a spec (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(obj, default=lambda x: np.asarray(x).tolist()))


class _Damage(Exception):
  """Evidence that a checkpoint's files are damaged (what is wrong in the message)."""


# What damaged files raise as orbax reads them (orbax 0.12, tensorstore): a file
# missing, JSON metadata that is not UTF-8 or does not parse, tensorstore's status for
# bytes that fail to decode or a key that is gone (orbax re-raises those `from` them).
# Nothing else is evidence: device or host memory exhausted, an I/O error such as EIO,
# a bug say nothing about the files, and a checkpoint that is whole must stay.
_DAMAGE_TYPES = (_Damage, FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)
_DAMAGE_STATUS = ("DATA_LOSS:", "NOT_FOUND:")


def _damaged(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, is evidence of damage."""
  while error is not None:
    if isinstance(error, _DAMAGE_TYPES):
      return True
    if isinstance(error, ValueError) and str(error).startswith(_DAMAGE_STATUS):
      return True
    error = error.__cause__
  return False


def _shapes(tree) -> dict[str, tuple]:
  """{leaf path: (shape, dtype)} of arrays, abstract arrays or orbax's array metadata."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    jax.tree_util.keystr(p, simple=True, separator="."): (tuple(x.shape), str(x.dtype))
    for p, x in flat
  }


def _difference(saved: dict, wanted: dict) -> str:
  """The first leaf where two `_shapes` differ, as "path: saved …, now …"."""
  show = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"
  key = min(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
  return f"{key}: saved {show(saved.get(key))}, now {show(wanted.get(key))}"


def saved_steps(directory: str) -> list[int]:
  """The steps of the committed checkpoints in a phase directory (orbax names each
  committed step's directory by its number), read without opening them."""
  path = os.path.join(directory, "checkpoints")
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(n) for n in names if n.isdigit())


def _remedy(directory: str, name: str) -> str:
  return f"restore it from a copy, or delete {directory} to train {name} again"


_ABSENT = object()


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
  """(dotted key, saved value, value now) of every field where two specs differ, nested
  sections field by field; _ABSENT for a field one side lacks."""
  out = []
  for k in sorted(set(saved) | set(now)):
    old, new = saved.get(k, _ABSENT), now.get(k, _ABSENT)
    if isinstance(old, dict) and isinstance(new, dict):
      out += _differences(old, new, f"{prefix}{k}.")
    elif old != new:
      out.append((f"{prefix}{k}", old, new))
  return out


def _shown(value) -> str:
  return "(absent)" if value is _ABSENT else repr(value)


class Checkpointer:
  """One phase directory: spec check, restore with fallback, save, metrics."""

  def __init__(self, directory: str, spec: dict, *, name: str, log=print, create: bool = True):
    """Opens (with create=False: only if it exists) the phase directory.

    Raises InputError when the directory's saved spec differs from `spec` or is
    damaged, when it holds checkpoints without a spec, and with create=False when
    the phase has never been started there.
    """
    self.directory, self.name, self.log = directory, name, log
    path = os.path.join(directory, "spec.json")
    if not os.path.exists(path):
      if saved_steps(directory):  # checkpoints of a configuration nobody recorded
        raise InputError(
          f"{directory} holds {name} checkpoints but no spec.json, the record of the "
          f"configuration they belong to: {_remedy(directory, name)}."
        )
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
    self._report_quarantined()
    self._manager = self._open()

  def _check_spec(self, path: str, spec: dict) -> None:
    try:
      with open(path) as f:
        stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      stored = None
    if not isinstance(stored, dict):
      raise InputError(
        f"{path} is damaged (not the JSON record of the configuration the {self.name} "
        f"checkpoints beside it belong to): {_remedy(self.directory, self.name)}."
      )
    if stored != spec:
      diffs = "; ".join(
        f"{k}: saved {_shown(old)}, now {_shown(new)}" for k, old, new in _differences(stored, spec)
      )
      raise InputError(
        f"{self.directory} holds a {self.name} run started with a different "
        f"configuration or inputs ({diffs}). Refusing to mix them: use another "
        f"--workdir, or delete {self.directory} to start this phase again."
      )

  def _report_quarantined(self) -> None:
    corrupt = os.path.join(self.directory, "corrupt")
    if os.path.isdir(corrupt) and (n := len(os.listdir(corrupt))):
      self.log(
        f"{self.name}: {corrupt} holds {n} quarantined checkpoint(s), moved aside when "
        f"found damaged; delete it once you no longer need them."
      )

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      os.path.join(self.directory, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, like, *, step: int | None = None, up_to: int | None = None):
    """The newest good checkpoint (at or before step `up_to`; or the one at `step`)
    shaped like `like`.

    Returns None when there is none. A checkpoint with evidence of damage
    (`_damaged`) is reported and moved aside, and the previous one used. A state of
    another structure than `like` is an InputError; any other failure (memory
    exhausted, an I/O error, a bug) propagates: neither moves anything.
    """
    for s in reversed(self.steps()):
      if (step is not None and s != step) or (up_to is not None and s > up_to):
        continue
      try:
        return self._restore(s, jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like))
      except Exception as e:
        if not _damaged(e):
          raise
        self._quarantine(s, e)
    return None

  def _restore(self, step: int, abstract):
    """The state at `step`: its structure checked against `abstract` (before anything
    else, so that other code's checkpoint is never taken for a damaged one), its record,
    its arrays, and their digest checked against the record's."""
    path = os.path.join(self.directory, "checkpoints", str(step), "state")
    saved = _shapes(ocp.StandardCheckpointHandler().metadata(pathlib.Path(path)).tree)
    if saved != (wanted := _shapes(abstract)):
      raise InputError(
        f"{self.name}: the checkpoint at step {step} in {self.directory} holds a state of "
        f"another structure than this code trains ({_difference(saved, wanted)}): other "
        f"code wrote it. It is left as it is: run that code, use another --workdir, or "
        f"delete {self.directory} to train {self.name} again."
      )
    record = self._record(step)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    state = self._manager.restore(step, args=args).state
    digest = experts.params_fingerprint(state)
    if digest != record["digest"]:  # same shapes and dtypes: the bytes differ
      raise _Damage(f"digest {digest[:12]}… != saved {record['digest'][:12]}…")
    return state

  def _record(self, step: int) -> dict:
    """The checkpoint's record (digest, step, final); _Damage when it is missing."""
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    try:
      record = self._manager.restore(step, args=args).meta
    except KeyError as e:  # orbax: no such item in the step's directory
      raise _Damage(f"its record is missing ({e})") from e
    if not (isinstance(record, dict) and isinstance(record.get("digest"), str)):
      raise _Damage(f"its record {str(record)[:80]!r} holds no digest")
    return record

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

  def save(self, state, metrics: dict, *, final: bool = False) -> None:
    """Appends the chunk's metric lines, then commits the checkpoint (with final=True:
    the last step of a run, kept by every later save), then prunes older ones."""
    step = int(state.step)
    rows = _rows(step - len(metrics["losses"]) + 1, metrics)
    if parallel.is_main():
      with open(self.metrics_path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows.values()))
        f.flush()
        os.fsync(f.fileno())
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(
          {"digest": experts.params_fingerprint(state), "step": step, "final": final}
        ),
      ),
    )
    self._manager.wait_until_finished()
    older = [s for s in self.steps() if s < step]
    for s in older[:-1]:  # the newest older one stays: the fallback if `step` is damaged
      if not self._final(s):
        self._manager.delete(s)

  def _final(self, step: int) -> bool:
    """Whether the checkpoint at `step` ended a run; one whose record cannot be read
    counts as final (never deleted unread: `restore` moves it aside if damaged)."""
    try:
      return bool(self._record(step).get("final", False))
    except Exception:
      return True

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.directory, "metrics.jsonl")

  def metrics(self, state, replay: Callable[[], tuple] | None = None) -> list[dict]:
    """The metric rows of steps 1..state.step, in step order, checked against the state.

    Unreadable lines and the rows of steps after the newest checkpoint (written by a
    run stopped before it saved them: they describe no checkpoint) are dropped from
    the file, announced, and duplicate steps merged (the last line of a step wins: it
    was written after the others); the steps the file lacks are announced. With
    `replay` (a function that reruns the training from its initial state to this
    step, returning (state, history)), they are rebuilt, but only when the replayed
    state's digest equals the state's: a replay is trusted where it reproduced the
    run bitwise, and otherwise the gap stays, announced.
    """
    up_to, path = int(state.step), self.metrics_path
    rows, unreadable, tidy = _read(path)
    parallel.sync(f"metrics read {path}")  # every process read it before it changes
    if unreadable:
      self.log(
        f"{self.name}: dropped {unreadable} unreadable line(s) from {path} (a write cut "
        f"short or a damaged file)."
      )
    ahead = sorted(s for s in rows if s > max(self.steps(), default=up_to))
    if ahead:
      self.log(
        f"{self.name}: dropped the rows of steps {format_steps(ahead)} from {path}: a run "
        f"that stopped before its next checkpoint wrote them."
      )
      rows = {s: r for s, r in rows.items() if s not in ahead}
    if ahead or not tidy:
      _write(path, rows)
    missing = missing_steps(rows.values(), up_to)
    if missing:
      self.log(
        f"{self.name}: {path} lacks the metric rows of steps {format_steps(missing)} of "
        f"the checkpoint's {up_to}"
        + ("; rebuilding them by replaying the run from its initial state." if replay else ".")
      )
    if missing and replay is not None:
      replayed, history = replay()
      got, want = experts.params_fingerprint(replayed), experts.params_fingerprint(state)
      if got == want:
        rows.update(_rows(1, history))
        _write(path, rows)
        self.log(f"{self.name}: rebuilt steps 1–{up_to} of {path}; the replay's digest matches.")
      else:
        self.log(
          f"{self.name}: the replay did not reproduce the checkpoint at step {up_to} (digest "
          f"{got[:12]}…, saved {want[:12]}…; a device that does not repeat runs bitwise), "
          f"so {path} keeps its gap."
        )
    return [rows[s] for s in sorted(rows) if s <= up_to]


def _rows(first: int, metrics: dict) -> dict[int, dict]:
  """Stacked metrics of consecutive steps from `first` → {step: JSON-ready row}."""
  n = len(metrics["losses"])
  return {
    first + i: {"step": first + i, **{k: np.asarray(v[i]).tolist() for k, v in metrics.items()}}
    for i in range(n)
  }


def _read(path: str) -> tuple[dict[int, dict], int, bool]:
  """(rows by step, number of unreadable lines, whether the file is tidy: no unreadable
  line, no step twice, and a newline at its end to append after)."""
  if not os.path.exists(path):
    return {}, 0, True
  with open(path, errors="replace") as f:
    text = f.read()
  rows, unreadable, lines = {}, 0, text.splitlines()
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if not (isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 1):
      unreadable += 1
      continue
    rows[row["step"]] = row
  tidy = not text or (not unreadable and len(rows) == len(lines) and text.endswith("\n"))
  return rows, unreadable, tidy


def _write(path: str, rows: dict[int, dict]) -> None:
  atomic_write(path, "".join(json.dumps(rows[s]) + "\n" for s in sorted(rows)))


def read_metrics(directory: str, up_to: int | None = None) -> list[dict]:
  """The metric rows of a phase directory (steps ≤ up_to), in step order; unreadable
  lines are skipped (`missing_steps` says which steps are absent)."""
  rows, _, _ = _read(os.path.join(directory, "metrics.jsonl"))
  return [rows[s] for s in sorted(rows) if up_to is None or s <= up_to]


def missing_steps(rows, up_to: int) -> list[int]:
  """The steps of 1..up_to that `rows` has no row for."""
  have = {r["step"] for r in rows}
  return [s for s in range(1, up_to + 1) if s not in have]


def format_steps(steps: list[int]) -> str:
  """Sorted steps as ranges: [1, 2, 3, 7] → "1–3, 7"."""
  runs: list[list[int]] = []
  for s in steps:
    if runs and s == runs[-1][1] + 1:
      runs[-1][1] = s
    else:
      runs.append([s, s])
  return ", ".join(f"{a}–{b}" if b > a else f"{a}" for a, b in runs)


def stack_metrics(rows: list[dict]) -> dict:
  """Rows → {name: array over steps}."""
  if not rows:
    return {}
  return {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k != "step"}
