"""Main jobs of one config over several runs (seeds, or reruns of a seed) on one table.

A results.json's intervals cover the noise of its test set, not that of training: two
runs of one config can differ by more than either's interval (a digits rerun on the same
GPU did). Runs that share their config except `seed` (and where the data lives), their
dataset and their device are read together here: each method's worst case as mean ± sd
over the runs, and in how many runs each paired difference from the robust gate exceeds
its noise. Only current runs are pooled; a STALE one is left out and named.
"""

import dataclasses
import json
import statistics
from typing import Any

from robust_gate.evaluate import REFERENCE
from robust_gate.report.inputs import Origin, Result
from robust_gate.report.tables import table
from robust_gate.summary import method_label

# Config fields that do not change what a run computes, left out of the grouping key.
_NOT_CONFIG = ("seed", "data_dir")


@dataclasses.dataclass(frozen=True)
class Run:
  """A main job that can be pooled: its results.json and where they came from."""

  name: str
  seed: str
  results: dict[str, Any]
  origin: Origin


def _keyed(r: Result) -> tuple[str, Run] | None:
  """(what runs must share to be pooled, the run); None: this result cannot be pooled."""
  res, origin = r.results, r.origin
  if res is None or origin is None or not isinstance(origin.provenance, dict):
    return None
  config = origin.provenance.get("config")
  if not isinstance(config, dict) or not isinstance(res.get("methods"), dict):
    return None
  shared = {k: v for k, v in config.items() if k not in _NOT_CONFIG}
  key = json.dumps(
    [shared, origin.field("device"), *(res.get(k) for k in ("dataset", "units", "baseline"))],
    sort_keys=True,
  )
  seed = config.get("seed")
  return key, Run(r.name, "?" if seed is None else str(seed), res, origin)


def groups(results: list[Result]) -> list[tuple[list[Run], list[Run]]]:
  """(current runs, stale runs) of each config run more than once, in page order; a
  group needs two current runs."""
  found: dict[str, list[Run]] = {}
  for r in results:
    keyed = _keyed(r)
    if keyed is not None:
      found.setdefault(keyed[0], []).append(keyed[1])
  out = []
  for members in found.values():
    current = [r for r in members if r.origin.stale is None]
    if len(current) >= 2:
      out.append((current, [r for r in members if r.origin.stale is not None]))
  return out


def _beyond(r: Run, name: str) -> int:
  """+1: the robust gate is better than `name` beyond noise in run r; −1: `name` is
  better beyond noise; 0: within noise or no paired interval."""
  paired = (r.results["methods"][name].get("vs_robust_gate") or {}).get("worst_case")
  if not (isinstance(paired, list) and len(paired) == 3):
    return 0
  _, low, high = paired
  return 1 if low > 0 else -1 if high < 0 else 0


def section(runs: list[Run], stale: list[Run], title: str) -> list[str]:
  """The markdown of one group: which runs, then one row per method every run has."""
  methods = [m for m in runs[0].results["methods"] if all(m in r.results["methods"] for r in runs)]
  units = runs[0].results.get("units", "bits/token")
  worst = {m: [float(r.results["methods"][m]["worst_case"]) for r in runs] for m in methods}
  lowest = {m: 0 for m in methods}
  for i in range(len(runs)):
    lowest[min(methods, key=lambda m: worst[m][i])] += 1
  seeds = [r.seed for r in runs]
  commits = sorted({r.origin.commit for r in runs})
  training = "training's (initialization, minibatches)"
  nondeterminism = "the device's run-to-run nondeterminism"
  if len(set(seeds)) == 1:
    spread = f"{nondeterminism} alone, as every run has the same seed"
  elif len(set(seeds)) < len(seeds):
    spread = f"{training} and, between runs of one seed, {nondeterminism}"
  else:
    spread = training
  lines = [
    f"## Over runs: {title}",
    "",
    f"{len(runs)} runs of one config ({', '.join(f'`{r.name}`' for r in runs)}) on "
    f"{runs[0].origin.field('device')}: seeds {', '.join(seeds)}, commit"
    f"{'s' if len(commits) > 1 else ''} {', '.join(commits)}, every one current. Each run's "
    "sections below give its intervals over test sequences; this table gives the spread "
    f"over the runs, which is {spread}.",
    "",
  ]
  if stale:
    lines += [f"Left out as STALE: {', '.join(f'`{r.name}`' for r in stale)}.", ""]
  rows = []
  for m in methods:
    w = worst[m]
    sd = statistics.stdev(w)
    if m == REFERENCE:
      better = against = "—"
    else:
      verdicts = [_beyond(r, m) for r in runs]
      better, against = str(verdicts.count(1)), str(verdicts.count(-1))
    rows.append(
      [
        method_label(m),
        f"{statistics.fmean(w):.4f} ± {sd:.4f}",
        f"{min(w):.4f}",
        f"{max(w):.4f}",
        str(lowest[m]),
        better,
        against,
      ]
    )
  head = [
    "method",
    f"worst case ({units}), mean ± sd",
    "min",
    "max",
    "runs lowest",
    "runs the robust gate is better beyond noise",
    "runs it is better than the robust gate beyond noise",
  ]
  lines += table(head, rows)
  others = [m for m in methods if m != REFERENCE]
  everywhere = sum(all(_beyond(r, m) == 1 for m in others) for r in runs)
  lines += [
    "",
    f"The robust gate's worst case is the lowest of these {len(methods)} methods in "
    f"{lowest.get(REFERENCE, 0)} of {len(runs)} runs, and below every other's beyond noise "
    f"in {everywhere} of {len(runs)}. A difference between methods is a finding over runs "
    "where it holds beyond noise in every run.",
    "",
  ]
  return lines
