"""How every experiment reports: a table in the log, a PNG and a JSON with provenance.

An experiment `name` writes `<workdir>/experiments/<name>.json` (its numbers, with
"experiment": name, "provenance": the commit, device, command and config that
made them, and under provenance.INPUTS_KEY the provenance of what it read: each
model's training runs and results.json's; robust_gate.provenance) and
`<workdir>/experiments/<name>.png`, both atomically (robust_gate.files).
"""

import json
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
  """Rows (name, values) under column headers; floats with `fmt`, anything else as text
  (`pm`'s "mean ± sd"); a column as wide as its widest cell."""
  cells = [[fmt.format(v) if isinstance(v, float) else str(v) for v in vals] for _, vals in rows]
  widths = [max([13] + [len(r[i]) + 1 for r in cells]) for i in range(len(cols))]
  lines = [f"{'':24s}" + "".join(f"{c[:12]:>{w}s}" for c, w in zip(cols, widths))]
  for (name, _), r in zip(rows, cells):
    lines.append(f"{name[:24]:24s}" + "".join(f"{c:>{w}s}" for c, w in zip(r, widths)))
  return "\n".join(lines)


def pm(spread: dict[str, Any]) -> str:
  """A `common.spread` of a number as "mean ± sd" for `table`."""
  return f"{spread['mean']:.4f} ± {spread['sd']:.4f}"


def inputs(workdir: str) -> dict[str, list[dict] | None]:
  """The provenance of what an experiment reads in a main job's `workdir`: every model's
  training runs (provenance.models) and the evaluation that wrote results.json (None
  where it has none)."""
  found = provenance.models(workdir)
  try:
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
      evaluation = json.load(f).get("provenance")
  except (OSError, ValueError, AttributeError):
    evaluation = None
  found["results.json"] = [evaluation] if isinstance(evaluation, dict) else None
  return found


def write(config, workdir: str, name: str, result: dict, fig=None, read=None) -> dict:
  """Writes experiment `name`'s JSON (with "experiment", "provenance" and the provenance
  of its inputs) and its figure; returns the dict written.

  `read`: the INPUTS_KEY entry, where the experiment read more than the main job in
  `workdir` (default: `inputs(workdir)`).
  """
  out = {
    "experiment": name,
    **result,
    "provenance": provenance.collect(config).to_dict(),
    provenance.INPUTS_KEY: inputs(workdir) if read is None else read,
  }
  if parallel.is_main():
    os.makedirs(os.path.join(workdir, DIRECTORY), exist_ok=True)
  files.write_json(path(workdir, name, "json"), out)
  if fig is not None:
    fig.tight_layout()
    files.write_figure(path(workdir, name, "png"), fig)
    plt().close(fig)
  return out
