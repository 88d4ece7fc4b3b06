"""How every experiment reports: a table in the log, a PNG and a JSON with provenance.

An experiment `name` writes `<workdir>/experiments/<name>.json` (its numbers, with
"experiment": name and "provenance": the commit, device, command and config that
made them; robust_gate.provenance) and `<workdir>/experiments/<name>.png`, both
atomically (robust_gate.files).
"""

import os
from collections.abc import Sequence
from typing import Any

from robust_gate import files, parallel, provenance

DIRECTORY = "experiments"  # under the workdir


def path(workdir: str, name: str, ext: str) -> str:
  """Where experiment `name` writes its `.json` or `.png`."""
  return os.path.join(workdir, DIRECTORY, f"{name}.{ext}")


def plt():
  """matplotlib.pyplot with the file-only Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot  # pylint: disable=g-import-not-at-top

  return pyplot


def table(rows: Sequence[tuple[str, Sequence[Any]]], cols: Sequence[str], fmt="{:10.4f}") -> str:
  """Rows (name, values) under column headers; floats with `fmt`, anything else as text."""
  head = f"{'':24s}" + "".join(f"{c[:12]:>13s}" for c in cols)
  lines = [head]
  for name, vals in rows:
    lines.append(
      f"{name[:24]:24s}"
      + "".join(f"{fmt.format(v):>13s}" if isinstance(v, float) else f"{v!s:>13s}" for v in vals)
    )
  return "\n".join(lines)


def write(config, workdir: str, name: str, result: dict, fig=None) -> dict:
  """Writes experiment `name`'s JSON (with "experiment" and "provenance") and its
  figure; returns the dict written."""
  out = {"experiment": name, **result, "provenance": provenance.collect(config).to_dict()}
  if parallel.is_main():
    os.makedirs(os.path.join(workdir, DIRECTORY), exist_ok=True)
  files.write_json(path(workdir, name, "json"), out)
  if fig is not None:
    fig.tight_layout()
    files.write_figure(path(workdir, name, "png"), fig)
    plt().close(fig)
  return out
