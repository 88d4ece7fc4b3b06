"""What a results page reads: a workdir's results, experiments and figures; a benchmark."""

import dataclasses
import glob
import json
import os
from typing import Any

from robust_gate.checks import InputError
from robust_gate.provenance import INPUTS_KEY
from robust_gate.report.staleness import check, short

# Where experiments write `<name>.json` and `.png` in a workdir: the current location
# first; `paper/` is where launch/paper.py wrote them before (read where no newer one is).
EXPERIMENT_DIRS = ("experiments", "paper")
# The experiments' order on the page; others follow by name.
EXPERIMENT_ORDER = (
  "mixtures",
  "conflict",
  "jsd",
  "gate_size",
  "prior",
  "extend",
  "prune",
  "ema",
  "convergence",
  "sequence_gate",
  "student_size",
  "student_seeds",
)
# Keys that are metadata of a JSON, not its body.
META_KEYS = ("provenance", INPUTS_KEY, "experiment")


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where one JSON's numbers came from: the file, its provenance and its inputs', why
  it is stale, what cannot be checked."""

  path: str
  provenance: dict[str, Any] | None  # None: the JSON has none
  inputs: dict[str, Any] | None  # its INPUTS_KEY: {input: [provenance, ...] or None}
  stale: str | None  # staleness.check's; None: current
  warning: str | None  # staleness.check's; None: nothing unknown

  def field(self, key: str) -> str:
    """A provenance field as text; "unknown" where there is none."""
    value = (self.provenance or {}).get(key)
    return "unknown" if value is None or value == "" else str(value)

  @property
  def commit(self) -> str:
    c = self.field("commit")
    return c if c == "unknown" else short(c)


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  body: dict[str, Any]  # the JSON without META_KEYS
  origin: Origin
  figure: str | None  # the PNG written beside the JSON


@dataclasses.dataclass(frozen=True)
class Result:
  """One main-job workdir: results.json (if any), its top-level figures, its experiments."""

  workdir: str
  name: str  # unique on the page: the workdir's basename, numbered if repeated
  results: dict[str, Any] | None  # results.json without META_KEYS; None: experiments only
  origin: Origin | None  # results.json's
  figures: tuple[str, ...]  # the workdir's top-level PNGs, by name
  experiments: tuple[Experiment, ...]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  workdir: str
  name: str
  body: dict[str, Any]  # benchmark.json without META_KEYS
  origin: Origin


def read_json(path: str) -> dict[str, Any]:
  """A JSON object from `path`, or InputError naming the file."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: no such file.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not valid JSON ({e}).") from None
  except OSError as e:
    raise InputError(f"{path}: cannot be read ({e.strerror}).") from None
  if not isinstance(obj, dict):
    raise InputError(f"{path}: expected a JSON object, found {type(obj).__name__}.")
  return obj


def _split(path: str, repo: str, needs_inputs: bool) -> tuple[dict[str, Any], Origin]:
  """The JSON at `path` as (body, Origin); `needs_inputs`: it was computed from trained
  models, whose provenance it must carry to be current."""
  obj = read_json(path)
  prov, inputs = obj.get("provenance"), obj.get(INPUTS_KEY)
  prov = prov if isinstance(prov, dict) else None
  inputs = inputs if isinstance(inputs, dict) else None
  verdict = check(prov, inputs, repo, needs_inputs=needs_inputs)
  body = {k: v for k, v in obj.items() if k not in META_KEYS}
  return body, Origin(path, prov, inputs, verdict.stale, verdict.warning)


def _experiment_key(name: str) -> tuple[int, str]:
  rank = EXPERIMENT_ORDER.index(name) if name in EXPERIMENT_ORDER else len(EXPERIMENT_ORDER)
  return rank, name


def read_experiments(workdir: str, repo: str) -> tuple[Experiment, ...]:
  found: dict[str, str] = {}
  for sub in EXPERIMENT_DIRS:
    for path in sorted(glob.glob(os.path.join(glob.escape(workdir), sub, "*.json"))):
      found.setdefault(os.path.splitext(os.path.basename(path))[0], path)
  out = []
  for name in sorted(found, key=_experiment_key):
    body, origin = _split(found[name], repo, needs_inputs=True)
    png = os.path.splitext(found[name])[0] + ".png"
    out.append(Experiment(name, body, origin, png if os.path.isfile(png) else None))
  return tuple(out)


def _unique_name(path: str, taken: set[str]) -> str:
  base = os.path.basename(os.path.normpath(path)) or "workdir"
  name, i = base, 1
  while name in taken:
    i += 1
    name = f"{base}-{i}"
  taken.add(name)
  return name


def _check_dir(workdir: str, flag: str) -> None:
  if not os.path.isdir(workdir):
    raise InputError(f"{flag}: {workdir!r} is not a directory.")


def read_result(workdir: str, repo: str, name: str) -> Result:
  """A main job's workdir; InputError where it has neither results.json nor experiments."""
  _check_dir(workdir, "--workdirs")
  experiments = read_experiments(workdir, repo)
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    if not experiments:
      raise InputError(
        f"{path}: no such file, and no experiments/*.json beside it; "
        f"run launch/main.py --workdir={workdir} first."
      )
    return Result(workdir, name, None, None, (), experiments)
  results, origin = _split(path, repo, needs_inputs=True)
  for key in ("domains", "methods"):
    if key not in results:
      raise InputError(f"{path}: no {key!r} key; is it the results.json of launch/main.py?")
  figures = tuple(sorted(glob.glob(os.path.join(glob.escape(workdir), "*.png"))))
  return Result(workdir, name, results, origin, figures, experiments)


def read_results(workdirs: list[str], repo: str) -> list[Result]:
  taken: set[str] = set()
  return [read_result(w, repo, _unique_name(w, taken)) for w in workdirs]


def read_benchmarks(workdirs: list[str], repo: str) -> list[Benchmark]:
  taken: set[str] = set()
  out = []
  for w in workdirs:
    _check_dir(w, "--bench_workdirs")
    body, origin = _split(os.path.join(w, "benchmark.json"), repo, needs_inputs=False)
    out.append(Benchmark(w, _unique_name(w, taken), body, origin))
  return out


def read_bytes(path: str) -> bytes:
  """A file's bytes (a figure to copy), or InputError naming it."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot be read ({e.strerror}).") from None
