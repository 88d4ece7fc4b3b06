"""Markdown tables from JSON: numbers, generic experiment bodies, benchmark measurements."""

import math
from typing import Any

# A list of at most this many scalars is shown inline in one cell (λ̄, [mean, sd]).
SHORT_LIST = 8
# A top-level list of scalars up to this length is shown in the summary (grids, seeds).
SUMMARY_LIST = 24
# Nested dicts are flattened into columns up to this depth (jsd's
# "runs[].models.robust_gate.exact_worst" is at depth 3).
MAX_DEPTH = 3
# A table wider than this and taller than wide is transposed (fields as rows).
MAX_COLUMNS = 10


def is_scalar(v: Any) -> bool:
  return v is None or isinstance(v, str | int | float | bool)


def _short_list(v: Any, n: int = SHORT_LIST) -> bool:
  return isinstance(v, list) and len(v) <= n and all(is_scalar(x) for x in v)


def fmt(v: Any) -> str:
  """A JSON value as text: floats to 4 decimals (bits/token), tiny or huge ones in e-notation."""
  if v is None or v == "":
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
  if isinstance(v, list):
    return ", ".join(fmt(x) for x in v) if v else "—"
  return str(v)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table; the first column left-aligned, the others right-aligned."""
  lines = [
    "| " + " | ".join(map(_cell, header)) + " |",
    "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
  ]
  lines += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
  return lines


def _flatten(d: dict, prefix: str, skipped: list[str], depth: int = 1) -> dict[str, Any]:
  """Scalar and short-list leaves of `d`, nested keys joined by '.'; the rest in `skipped`."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if is_scalar(v) or _short_list(v):
      out[key] = v
    elif isinstance(v, dict) and depth < MAX_DEPTH:
      out.update(_flatten(v, f"{key}.", skipped, depth + 1))
    elif key not in skipped:
      skipped.append(key)
  return out


def _rows_table(label: str, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
  """Rows named by their first element with columns the union of their fields, in order."""
  columns: list[str] = []
  for _, r in rows:
    columns += [c for c in r if c not in columns]
  if len(columns) > MAX_COLUMNS and len(rows) < len(columns):
    return table(
      ["field", *(n for n, _ in rows)],
      [[c, *(fmt(r[c]) if c in r else "" for _, r in rows)] for c in columns],
    )
  return table(
    [label, *columns], [[n, *(fmt(r[c]) if c in r else "" for c in columns)] for n, r in rows]
  )


def _records(named: list[tuple[str, dict]], path: str, skipped: list[str]):
  """Each record flattened into a row; the fields left out named once in `skipped`."""
  rows = []
  for name, r in named:
    left_out: list[str] = []
    rows.append((str(name), _flatten(r, "", left_out)))
    skipped += [f"{path}{s}" for s in left_out if f"{path}{s}" not in skipped]
  return rows


def body_tables(body: dict[str, Any]) -> list[str]:
  """An experiment's JSON as markdown: a summary of its scalar fields, then one table per
  dict of scalars, dict of records or list of records; what has no table shape (curves,
  matrices) is named in a closing note."""
  summary: list[list[str]] = []
  parts: list[str] = []
  skipped: list[str] = []
  for key, v in body.items():
    if is_scalar(v) or _short_list(v, SUMMARY_LIST):
      summary.append([key, fmt(v)])
    elif isinstance(v, dict) and v and all(is_scalar(x) or _short_list(x) for x in v.values()):
      parts += [f"**{key}**", "", *table(list(v), [[fmt(x) for x in v.values()]]), ""]
    elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
      rows = _records(list(v.items()), f"{key}.*.", skipped)
      parts += [f"**{key}**", "", *_rows_table(key, rows), ""]
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
      rows = _records([(str(i + 1), r) for i, r in enumerate(v)], f"{key}[].", skipped)
      parts += [f"**{key}**", "", *_rows_table("#", rows), ""]
    else:
      skipped.append(key)
  lines = [*table(["field", "value"], summary), ""] if summary else []
  lines += parts
  if skipped:
    lines += ["Not shown (see the JSON): " + ", ".join(f"`{s}`" for s in skipped) + ".", ""]
  return lines


# Units of benchmark measurements by the words their key contains, first match wins:
# (words, unit, how to scale). Words are matched whole between underscores; the
# benchmark names units in its keys (robust_gate.benchmark.records): `_seconds`,
# `_per_second`, `_tflops` (10¹² FLOP/s), `_bytes`, ratios `a_over_b`, `speedup`.
_UNITS: tuple[tuple[tuple[str, ...], str, str], ...] = (
  (("tflops",), "TFLOP/s", "plain"),
  (("flops", "per", "step"), "FLOP", "si"),
  (("flops", "per", "token"), "FLOP", "si"),
  (("flops", "per", "s"), "FLOP/s", "si"),
  (("tokens", "per", "s"), "tokens/s", "si"),
  (("tokens", "per", "second"), "tokens/s", "si"),
  (("per", "s"), "/s", "si"),
  (("per", "second"), "/s", "si"),
  (("seconds",), "s", "time"),
  (("bytes",), "B", "binary"),
  (("mfu",), "%", "percent"),
  (("over",), "×", "plain"),
  (("ratio",), "×", "plain"),
  (("speedup",), "×", "plain"),
)


def _contains(words: list[str], pattern: tuple[str, ...]) -> bool:
  n = len(pattern)
  return any(tuple(words[i : i + n]) == pattern for i in range(len(words) - n + 1))


def _scaled(v: float, steps: tuple[tuple[float, str], ...]) -> tuple[float, str]:
  for factor, prefix in steps:
    if abs(v) >= factor:
      return v / factor, prefix
  return v / steps[-1][0], steps[-1][1]


def measurement(key: str, v: Any) -> tuple[str, str]:
  """(value, unit) of one benchmark measurement, the unit read off its key's suffix."""
  words = key.replace(".", "_").lower().split("_")
  if not isinstance(v, int | float) or isinstance(v, bool):
    return fmt(v), ""
  for pattern, unit, kind in _UNITS:
    if not _contains(words, pattern):
      continue
    if kind == "time":
      x, p = _scaled(v, ((1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")))
    elif kind == "si":
      x, p = _scaled(v, ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")))
    elif kind == "binary":
      x, p = _scaled(v, ((2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki"), (1, "")))
    elif kind == "percent":
      x, p = 100.0 * v, ""
    else:
      x, p = v, ""
    return f"{x:.4g}", p + unit
  return fmt(v), ""


def measurements_table(phase: dict[str, Any]) -> list[str]:
  """One phase's flat measurements (and one level of nested ones) as measurement | value | unit."""
  skipped: list[str] = []
  flat = _flatten(phase, "", skipped)
  rows = [[k, *measurement(k, v)] for k, v in flat.items()]
  lines = table(["measurement", "value", "unit"], rows)
  if skipped:
    lines += ["", "Not shown (see the JSON): " + ", ".join(f"`{s}`" for s in skipped) + "."]
  return lines


def profile_table(profile: dict[str, Any], top: int = 5) -> list[str]:
  """A device profile (benchmark.timing.Profile): busy time by kind of op, the longest ops."""
  rows = [["all device ops", *measurement("seconds", profile.get("device_seconds")), ""]]
  by_kind = profile.get("by_kind") or {}
  rows += [[f"kind: {k}", *measurement("seconds", t), ""] for k, t in by_kind.items()]
  for name, t, count in (profile.get("ops") or [])[:top]:
    short = name if len(name) <= 60 else name[:59] + "…"
    rows.append([f"op: `{short}`", *measurement("seconds", t), str(count)])
  return table(["device time of one call", "value", "unit", "calls"], rows)
