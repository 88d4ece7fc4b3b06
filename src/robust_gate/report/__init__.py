"""Results pages generated from workdirs: docs/results.md, docs/performance.md, docs/figures/.

  python launch/report.py --workdirs=/tmp/rg,/tmp/rg_digits --bench_workdirs=/tmp/bench --out=docs

Reads `<workdir>/results.json`, `<workdir>/experiments/<name>.json` (or the older
`<workdir>/paper/`) with their PNGs, and `<bench_workdir>/benchmark.json`; every
JSON carries the provenance of robust_gate.provenance. Each number on the pages
sits under a header naming the commit and device that made it, marked STALE
(`stale_reason`) where the code it depends on changed after it was made.
"""

import os

from robust_gate.report import inputs, pages
from robust_gate.report.inputs import Benchmark, Experiment, Origin, Result
from robust_gate.report.staleness import head, stale_reason

__all__ = [
  "REPO",
  "Benchmark",
  "Experiment",
  "Origin",
  "Result",
  "generate",
  "stale_reason",
]

# The checkout this package runs from (`pip install -e .`), whose history dates results.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def generate(
  workdirs: list[str], bench_workdirs: list[str], out: str, command: str, repo: str = REPO
) -> list[str]:
  """Writes out/results.md (with out/figures/) for `workdirs` and out/performance.md for
  `bench_workdirs` (each only where given); returns the pages written.

  Every input is read before anything is written, so an unreadable one (InputError)
  leaves `out` as it was.
  """
  results = inputs.read_results(workdirs, repo)
  benchmarks = inputs.read_benchmarks(bench_workdirs, repo)
  banner = pages.banner(command, *head(repo))
  os.makedirs(out, exist_ok=True)
  written = []
  if workdirs:
    pages.clear_figures(out)
    written.append(
      _write(os.path.join(out, "results.md"), pages.results_page(results, out, banner))
    )
  if bench_workdirs:
    text = pages.performance_page(benchmarks, banner)
    written.append(_write(os.path.join(out, "performance.md"), text))
  return written


def _write(path: str, text: str) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path
