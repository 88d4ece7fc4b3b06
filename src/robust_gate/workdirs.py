"""A workdir: created with a clear error, and used by one run at a time.

Two runs in one workdir would prepare the same data, train the same models and
write the same checkpoints and metric lines at once, each moving the other's
half-written files aside as corrupt. So every launcher holds `<workdir>/lock` for
the whole run (`lock`, taken by robust_gate.cli): `fcntl.flock` on it says whether
a run is alive (the kernel releases it when the process ends, however it ends),
and the file records who holds it (pid, host, start, command) for the messages.

    a live run on this host (or on another, where the filesystem carries flock
    across hosts)       → refused, naming its pid, host and command;
    a record left by a run that ended on this host (killed)
                        → taken over, announced;
    a record from another host (whose process this host cannot check), or one that
    cannot be read (not UTF-8 JSON: it names no host to check)
                        → refused, naming what it says and how to clear it.

A run releases the lock by emptying the file: an empty file is a free lock. In a
multi-host job, process 0 takes the lock for all and tells the others whether it did,
whatever stopped it (a bug included), so no process waits for the others forever.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from robust_gate import parallel
from robust_gate.checks import InputError

LOCK = "lock"


def create(workdir: str) -> None:
  """Makes the workdir on process 0; InputError when it cannot be a directory."""
  try:
    if parallel.is_main():
      os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot use --workdir={workdir!r}: {e.strerror}.") from e


def _record(f) -> dict | None:
  """Who the lock file names: None when it is empty (free); {} when it cannot be read
  (not UTF-8, not JSON, or not a JSON object)."""
  f.seek(0)
  raw = f.read()
  if not raw:
    return None
  try:
    holder = json.loads(raw.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError, JSONDecodeError
    return {}
  return holder if isinstance(holder, dict) else {}


def _who(holder: dict | None) -> str:
  if not holder:
    return "a run whose record is not written yet, or is unreadable"
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}, "
    f"running {holder.get('command')!r}"
  )


def _acquire(workdir: str, log):
  """The lock file of `workdir`, opened and flocked, with this run's record in it."""
  create(workdir)
  path = os.path.join(workdir, LOCK)
  f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _record(f)
    f.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES):
      raise InputError(
        f"cannot lock {path}: {e.strerror} (a filesystem without flock); use a --workdir "
        f"on one that has it, such as a local disk."
      ) from e
    raise InputError(
      f"another run is using the workdir {workdir} ({_who(holder)}): two runs in one "
      f"workdir would overwrite each other's checkpoints; wait for it to end, stop it, or "
      f"use another --workdir."
    ) from None
  holder, host = _record(f), socket.gethostname()
  if holder == {}:
    f.close()
    raise InputError(
      f"{path} holds no readable record of the run that took this workdir (damaged, or "
      f"written by another program), so this host cannot check whether that run is alive "
      f"elsewhere: if no run is using the workdir, delete {path} and run again."
    )
  if holder and holder.get("host") != host:
    f.close()
    raise InputError(
      f"{path} says a run holds this workdir on another host ({_who(holder)}), which "
      f"this host cannot check: if no run is using the workdir, delete {path} and run "
      f"again; otherwise wait for it or use another --workdir."
    )
  if holder is not None:
    log(f"note: took over {path} from {_who(holder)}: that run ended without releasing it.")
  mine = {
    "pid": os.getpid(),
    "host": host,
    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
  }
  f.seek(0)
  f.truncate()
  f.write(json.dumps(mine).encode())
  f.flush()
  os.fsync(f.fileno())
  return f


def _on_every_process(ok: bool) -> bool:
  """Process 0's `ok`, on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


@contextlib.contextmanager
def lock(workdir: str, log=print) -> Iterator[None]:
  """Holds `workdir` for this run (creating it): InputError when another run holds it.

  Process 0 takes the lock; every process raises when it could not: process 0 its own
  error (a bug keeps its traceback), the others one line.
  """
  f, error = None, None
  if parallel.is_main():
    try:
      f = _acquire(workdir, log)
    except Exception as e:  # told to the others whatever it is, or they would wait forever
      error = e
  if not _on_every_process(error is None):
    raise error or InputError(f"process 0 could not take the lock of {workdir}; see its output.")
  try:
    yield
  finally:
    if f is not None:
      f.seek(0)
      f.truncate()
      f.close()
