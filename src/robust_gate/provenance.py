"""Where a result came from: the code's commit, the config, the device and the date.

Every JSON the job writes (results, experiments, benchmarks) carries
`collect(config).to_dict()` under the key "provenance", so that a results page
(`robust_gate.report`) can name the commit and device of every number and mark a
result stale when the code it depends on changed after it was made.
"""

import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from typing import Any

import jax

# The repository root when the package runs from a checkout (`pip install -e .`).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The code every result depends on: a commit to these paths makes older results stale.
CODE_PATHS = ("src/robust_gate", "launch")


@dataclasses.dataclass(frozen=True)
class Provenance:
  commit: str  # git HEAD of the checkout; "unknown" outside one
  dirty: bool  # tracked files under CODE_PATHS differed from the commit
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


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(
      ["git", "-C", _REPO, *args], capture_output=True, text=True, timeout=10, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_commit() -> tuple[str, bool]:
  """(HEAD, dirty) of the checkout the package runs from.

  `ROBUST_GATE_COMMIT` overrides both (a copy of the tree without `.git`, such as
  a remote accelerator's, states the commit it was copied from; it is not dirty).
  """
  if os.environ.get("ROBUST_GATE_COMMIT"):
    return os.environ["ROBUST_GATE_COMMIT"], False
  head = _git("rev-parse", "HEAD")
  if not head:
    return "unknown", False
  status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
  return head, bool(status)


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
