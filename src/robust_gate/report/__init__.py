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
import shutil

from robust_gate import files, provenance
from robust_gate.checks import InputError
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
  "keep",
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


def keep(
  workdirs: list[str], bench_workdirs: list[str], folder: str, repo: str = REPO
) -> tuple[list[str], list[str]]:
  """Copies what the pages read from each workdir (results.json and its figures,
  experiments/ or paper/ with theirs, benchmark.json) into `folder`/<name>/, <name> as
  on the page, replacing an earlier copy; returns the copies' paths in the same order.

  A workdir lives where its job ran (often a /tmp that goes with its machine); its
  copies, committed, let anyone generate the pages again from a clone. Every input is
  read (InputError) before anything is written; a workdir that is already its own copy
  is left as it is.
  """
  results = inputs.read_results(workdirs, repo)
  benchmarks = inputs.read_benchmarks(bench_workdirs, repo)
  plan: dict[str, tuple[str, list[str]]] = {}  # name: (workdir, its files)
  for r in results:
    paths = [r.origin.path] if r.origin else []
    paths += list(r.figures)
    for e in r.experiments:
      paths += [e.origin.path] + ([e.figure] if e.figure else [])
    plan[r.name] = (r.workdir, paths)
  for b in benchmarks:
    if b.name in plan:
      raise InputError(
        f"--bench_workdirs: {b.workdir!r} has the name {b.name!r} of a main-job workdir; "
        f"rename one."
      )
    plan[b.name] = (b.workdir, [b.origin.path])
  copies = {name: os.path.join(folder, name) for name in plan}
  content = {  # every file read before any is written
    name: {os.path.relpath(p, workdir): inputs.read_bytes(p) for p in paths}
    for name, (workdir, paths) in plan.items()
    if os.path.realpath(workdir) != os.path.realpath(copies[name])
  }
  for name, kept in content.items():
    dest = copies[name]
    staging = os.path.join(folder, f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for rel, data in kept.items():
      os.makedirs(os.path.dirname(os.path.join(staging, rel)), exist_ok=True)
      files.atomic_write(os.path.join(staging, rel), data)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
  return [copies[r.name] for r in results], [copies[b.name] for b in benchmarks]
