"""Results pages generated from workdirs: docs/results.md, docs/performance.md, docs/figures/.

  python launch/report.py --workdirs=/tmp/rg,/tmp/rg_digits --bench_workdirs=/tmp/bench --out=docs

Reads `<workdir>/results.json`, `<workdir>/experiments/<name>.json` (or the older
`<workdir>/paper/`) with their PNGs, and `<bench_workdir>/benchmark.json`; every
JSON carries the provenance of robust_gate.provenance, and one computed from trained
models carries theirs (provenance.INPUTS_KEY). A main job's numbers carry their
bootstrap intervals and the number of training seeds behind them (`held_out`). Each
number on the pages sits under a header naming the commit and device that made it,
marked STALE (`check`) where the code it or any of its inputs depends on changed after
they were made, and WARNING where that cannot be fully checked (a copied tree's unknown
dirtiness).
"""

import os

from robust_gate import files, provenance
from robust_gate.report import inputs, pages
from robust_gate.report.inputs import Benchmark, Experiment, Origin, Result
from robust_gate.report.staleness import Verdict, check, stale_reason

__all__ = [
  "REPO",
  "Benchmark",
  "Experiment",
  "Origin",
  "Result",
  "Verdict",
  "check",
  "generate",
  "stale_reason",
]

# The checkout this package runs from (`pip install -e .`), whose history dates results.
REPO = provenance.REPO


def generate(
  workdirs: list[str], bench_workdirs: list[str], out: str, command: str, repo: str = REPO
) -> list[str]:
  """Writes out/results.md (with out/figures/) for `workdirs` and out/performance.md for
  `bench_workdirs` (each only where given); returns the pages written.

  Every input (figures included) is read before anything is written, so an unreadable
  one (InputError) leaves `out` as it was. Each file is replaced atomically; the
  figures no page links any more are removed last, so a failure midway never leaves a
  page without its figures.
  """
  results = inputs.read_results(workdirs, repo)
  benchmarks = inputs.read_benchmarks(bench_workdirs, repo)
  banner = pages.banner(command, *provenance.repo_state(repo))
  pending: dict[str, bytes] = {}  # path under `out`: content, figures before pages
  if workdirs:
    text, figures = pages.results_page(results, banner)
    pending |= {rel: inputs.read_bytes(src) for rel, src in figures.items()}
    pending["results.md"] = text.encode("utf-8")
  if bench_workdirs:
    pending["performance.md"] = pages.performance_page(benchmarks, banner).encode("utf-8")
  for rel, content in pending.items():
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write(path, content)
  if workdirs:
    pages.remove_unlinked_figures(out, set(pending))
  return [os.path.join(out, p) for p in ("results.md", "performance.md") if p in pending]
