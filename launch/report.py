r"""The results pages, generated from workdirs (never written by hand).

  python launch/report.py --workdirs=/tmp/rg,/tmp/rg_digits,/tmp/rg_synth \
      --bench_workdirs=/tmp/bench_h100 --out=docs --keep=docs/inputs

Writes <out>/results.md (one section per --workdirs entry: its results.json, every
number with its bootstrap interval, which differences from the robust gate exceed their
noise and the certificate, figures and experiments, the PNGs copied into <out>/figures/)
and <out>/performance.md (one per --bench_workdirs entry's benchmark.json). Each table
names the commit and device that made it; a result whose code, or whose models'
training code, changed since is marked STALE (robust_gate.report).

--keep=DIR first copies what the pages read from each workdir into DIR/<name>/
(`report.keep`) and generates from the copies; the pages then name the command over the
copies, which regenerates them from a clone once DIR is committed:

  python launch/report.py --workdirs=docs/inputs/rg,... --out=docs
"""

import os
import shlex
import sys

from absl import app, flags

from robust_gate import report
from robust_gate.checks import InputError

_WORKDIRS = flags.DEFINE_list("workdirs", [], "Main-job workdirs, in page order.")
_BENCH = flags.DEFINE_list("bench_workdirs", [], "Benchmark workdirs, in page order.")
_OUT = flags.DEFINE_string("out", "docs", "Folder of the pages and their figures/.")
_KEEP = flags.DEFINE_string(
  "keep", None, "Copy each workdir's inputs of the pages into this folder first and use those."
)


def command(argv: list[str]) -> str:
  """The command line as typed from the repository root: `python launch/report.py ...`."""
  script = os.path.relpath(os.path.abspath(argv[0]), report.REPO)
  return shlex.join(["python", script, *argv[1:]])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIRS.value and not _BENCH.value:
    raise app.UsageError("give --workdirs, --bench_workdirs or both.")
  try:
    workdirs, bench, argv = _WORKDIRS.value, _BENCH.value, sys.argv
    if _KEEP.value:
      workdirs, bench = report.keep(workdirs, bench, _KEEP.value)
      lists = (("workdirs", workdirs), ("bench_workdirs", bench))
      argv = [argv[0], *(f"--{n}={','.join(v)}" for n, v in lists if v), f"--out={_OUT.value}"]
      print(f"kept the inputs in {_KEEP.value}/: {', '.join(workdirs + bench)}")
    for path in report.generate(workdirs, bench, _OUT.value, command(argv)):
      print(f"wrote {path}")
  except InputError as e:
    sys.exit(f"robust_gate: {e}")


if __name__ == "__main__":
  app.run(main)
