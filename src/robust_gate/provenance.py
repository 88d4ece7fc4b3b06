"""Where a result came from: the code's commit, the config, the device and the date.

Every JSON the job writes (results, experiments, benchmarks) carries
`collect(config).to_dict()` under the key "provenance", so that a results page
(`robust_gate.report`) can name the commit and device of every number and mark a
result stale when the code it depends on changed after it was made.

A result is also only as current as the models it was computed from, which may have
been trained by older code than the process that evaluates them. Each model's
directory therefore keeps the provenance of every run that trained it
(`record_training`, `<workdir>/<model>/provenance.json`), and a result computed from
a workdir's models carries theirs under INPUTS_KEY (`models(workdir)`); the report
checks every provenance a result carries.
"""

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax

from robust_gate import files, layout, parallel
from robust_gate.checks import InputError

# The repository root when the package runs from a checkout (`pip install -e .`).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The code every result depends on: a commit to these paths makes older results stale.
CODE_PATHS = ("src/robust_gate", "launch")
# A model directory's record of the runs that trained it.
TRAINING_FILE = "provenance.json"
# The workdir's model directories, whose training each result names (robust_gate.layout).
MODEL_DIRS = layout.MODEL_DIRS
# The key of a result JSON holding the provenance of its inputs: {input: [provenance,
# ...] or None}, None where the input's origin is unknown (so the result is stale).
INPUTS_KEY = "input_provenance"


@dataclasses.dataclass(frozen=True)
class Provenance:
  commit: str  # git HEAD of the checkout; "unknown" outside one
  # Whether the code under CODE_PATHS differed from the commit: tracked changes or new
  # .py files. None: unknown (a copied tree that states its commit; see git_commit).
  dirty: bool | None
  date: str  # ISO 8601, UTC
  device: str  # e.g. "1 × NVIDIA H100 80GB HBM3" or "8 × cpu"
  platform: str  # jax's backend: cpu, gpu, tpu
  process_count: int
  host: str  # CPU model or machine name, where the OS says
  jax_version: str
  command: str  # the command line that produced the result
  config: dict[str, Any] | None  # the full config, where there is one

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def git(repo: str, *args: str) -> str | None:
  """stdout of `git -C repo args`, stripped; None where git fails (no repo, bad commit,
  no git), so that a caller can tell "no output" ("") from "cannot tell" (None)."""
  try:
    out = subprocess.run(
      ["git", "-C", repo, *args], capture_output=True, text=True, timeout=30, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def _changes_code(status_line: str) -> bool:
  """Whether one `git status --porcelain` line changes the code: any change to a tracked
  file, or a new (untracked) .py file, which an import or a launcher may run."""
  code, path = status_line[:2], status_line[3:]
  return code != "??" or path.endswith(".py")


def repo_state(repo: str) -> tuple[str, bool]:
  """(HEAD, dirty under CODE_PATHS) of the checkout `repo`; ("unknown", False) outside one."""
  head = git(repo, "rev-parse", "HEAD")
  if not head:
    return "unknown", False
  status = git(repo, "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS)
  return head, any(_changes_code(line) for line in (status or "").splitlines())


def git_commit() -> tuple[str, bool | None]:
  """(HEAD, dirty) of the checkout the package runs from.

  `ROBUST_GATE_COMMIT` (a copy of the tree without `.git`, such as a remote
  accelerator's) states the commit; whether the copy differed from it cannot be
  checked there, so dirty is None, which the report shows as a warning beside the
  result rather than marking it stale.
  """
  if os.environ.get("ROBUST_GATE_COMMIT"):
    return os.environ["ROBUST_GATE_COMMIT"], None
  return repo_state(REPO)


def _host() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
  except OSError:
    pass
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def device_description() -> str:
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return f"{len(devices)} × {', '.join(kinds)}"


def collect(config=None) -> Provenance:
  """The provenance of a result made now, by this process, with `config`.

  Args:
    config: an ml_collections ConfigDict, a dataclass, a dict, or None.
  """
  if config is not None and hasattr(config, "to_dict"):
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  commit, dirty = git_commit()
  return Provenance(
    commit=commit,
    dirty=dirty,
    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    device=device_description(),
    platform=jax.devices()[0].platform,
    process_count=jax.process_count(),
    host=_host(),
    jax_version=jax.__version__,
    command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    config=config,
  )


def read_training(directory: str) -> list[dict[str, Any]] | None:
  """The provenance of every run that trained the model in `directory`, oldest first;
  None where it has no TRAINING_FILE (trained before models recorded it: unknown code).

  Raises InputError where the file is not what `record_training` writes.
  """
  path = os.path.join(directory, TRAINING_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      runs = json.load(f).get("runs")
  except FileNotFoundError:
    return None
  except (OSError, ValueError, AttributeError) as e:
    raise InputError(f"{path}: not a training provenance file ({e}).") from None
  if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
    raise InputError(f"{path}: 'runs' is not a list of provenance records.")
  return runs


def record_training(directory: str) -> None:
  """Adds this process's provenance to the TRAINING_FILE of the model in `directory`.

  Call it when a run is about to train steps of that model. Runs are appended, never
  replaced: a model resumed by newer code still names the older code that trained its
  first steps, so the report cannot take it for current. The record's config is None:
  the model's configuration is its spec.json beside it. Process 0 writes, atomically.
  """
  if not parallel.is_main():
    return
  runs = read_training(directory) or []
  os.makedirs(directory, exist_ok=True)
  record = collect().to_dict()
  files.write_json(os.path.join(directory, TRAINING_FILE), {"runs": [*runs, record]})


def models(workdir: str) -> dict[str, list[dict[str, Any]] | None]:
  """{model: read_training} for every MODEL_DIRS of `workdir`: the INPUTS_KEY entry of
  a result computed from the workdir's models."""
  return {name: read_training(os.path.join(workdir, name)) for name in MODEL_DIRS}
