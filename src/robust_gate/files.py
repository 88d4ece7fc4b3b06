"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new
one, never part of one. Every file the job writes whole goes through `atomic_write`
(spec.json, config.json, results.json, the expert caches, the experiments' JSON, the
plots).

Only process 0 writes (one writer across hosts; `parallel.is_main`).
"""

import io
import json
import os
from typing import Any

from robust_gate import parallel


def atomic_write(path: str, content: str | bytes) -> None:
  """Replaces `path` whole with `content` (text or bytes), on process 0 only."""
  if not parallel.is_main():
    return
  tmp = f"{path}.tmp{os.getpid()}"
  binary = isinstance(content, bytes)
  with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """`obj` as indented JSON at `path`, atomically (tuples as lists)."""
  atomic_write(path, json.dumps(obj, indent=1, default=list))


def write_figure(path: str, fig, dpi: int = 110) -> None:
  """A matplotlib figure as a PNG at `path`, atomically."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  atomic_write(path, buffer.getvalue())
