"""The shared body of the absl launchers in launch/: flags, errors, output.

Every launcher is `cli.main(phase_fn, default_config)`: `--config` (an
ml_collections config file, overridable field by field: `--config.gate.steps=3000`)
and `--workdir`. The run holds the workdir's lock throughout (robust_gate.workdirs):
a second run on the same workdir is refused. A problem the user caused (bad config,
bad data, a damaged or foreign file in the workdir, a run that diverged, a disk that
is full or a path without permission) ends with one line naming it and what to do,
not a traceback; what was already saved in the workdir is left as it was. Anything
else (a bug) ends with its traceback and a non-zero exit status.
"""

import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from robust_gate import parallel, workdirs
from robust_gate.checks import InputError

Phase = Callable[..., Any]  # (config, workdir, log) -> anything

# The launcher's flags, defined once per process (absl refuses a second definition;
# in-process callers such as the tests run `main` more than once).
_FLAGS: dict[str, flags.FlagHolder] = {}


def _unknown_field(error: Exception) -> None:
  """Exits with one line if `error` is ml_collections refusing a `--config.<path>`
  override that names no config field; returns otherwise.

  ml_collections raises a bare AttributeError or KeyError from its config_path
  module while it applies the overrides to the loaded config (during flag parsing);
  one raised anywhere else is not about an override, and is left to propagate.
  """
  if not isinstance(error, (AttributeError, KeyError)):
    return
  frames = traceback.extract_tb(error.__traceback__)
  if not any(os.path.abspath(f.filename) == os.path.abspath(config_path.__file__) for f in frames):
    return
  message = error.args[0] if error.args else ""
  while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(...))
    message = message.args[0]
  lines = str(message).splitlines() or ["?"]
  name = lines[0].strip("'\" ")
  hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""  # ml_collections' "Did you mean"
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
  sys.exit(
    f"robust_gate: unknown config field '{name}' in {overrides}{hint}; every field is "
    f"listed, with a comment, in launch/configs/wordfreq.py."
  )


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override naming no config field as one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    _unknown_field(e)
    raise


def _define_flags(default_config: str) -> dict[str, flags.FlagHolder]:
  if _FLAGS:
    return _FLAGS
  try:  # without --config, the default file is loaded (and overridden) right here
    _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", default_config, "Experiment configuration file.", lock_config=True
    )
  except (AttributeError, KeyError) as e:
    _unknown_field(e)
    raise
  _FLAGS["workdir"] = flags.DEFINE_string(
    "workdir", None, "Output directory (resumable).", required=True
  )
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0; with "
    "--num_processes and --process_id, calls jax.distributed.initialize.",
  )
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Multi-host: processes.")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "Multi-host: this process.")
  _FLAGS["distributed"] = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize() with the "
    "cluster's own settings (Cloud TPU, SLURM, ...) for flags not given.",
  )
  return _FLAGS


def _os_error(e: OSError, workdir: str) -> str:
  """The one line for a file the system refused: which file, why, what to do."""
  path = os.fsdecode(e.filename) if e.filename is not None else None
  top = os.path.abspath(workdir)
  inside = path is not None and os.path.commonpath([os.path.abspath(path), top]) == top
  verb = "access" if e.errno == errno.EACCES else "write"
  what = f"{path}{' in the workdir' if inside else ''}" if path else "a file (unnamed by the OS)"
  fix = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix its permissions"
  return (
    f"robust_gate: cannot {verb} {what}: {e.strerror}. Files already saved in "
    f"the workdir {workdir!r} are intact; {fix} and run the same command again to resume."
  )


def run_phase(phase: Phase, config, workdir: str, log: Callable[[str], None] = print) -> None:
  """`phase(config, workdir, log)` holding the workdir's lock, with the errors a user
  caused as one line (SystemExit with the message): InputError, a diverged run
  (FloatingPointError from train.fit), a full disk or a path without permission.
  Every other exception propagates unchanged."""
  try:
    with workdirs.lock(workdir, log):
      phase(config, workdir, log=log)
  except (InputError, FloatingPointError) as e:
    sys.exit(f"robust_gate: {e}")
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
      sys.exit(_os_error(e, workdir))
    raise


def main(phase: Phase, default_config: str) -> None:
  """Defines --config/--workdir and runs `phase(config, workdir, log)` under absl.

  The flags (and with them every --config.<field> override) are parsed before the
  phase starts; only that parsing can end in "unknown config field".
  """
  f = _define_flags(default_config)

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)  # tfds' notes on custom configs are noise
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tfds.disable_progress_bar()
    import jax  # pylint: disable=g-import-not-at-top

    if f["distributed"].value or f["coordinator_address"].value:
      jax.distributed.initialize(
        f["coordinator_address"].value, f["num_processes"].value, f["process_id"].value
      )
    log = (lambda s: print(s, flush=True)) if parallel.is_main() else (lambda s: None)
    run_phase(phase, f["config"].value, f["workdir"].value, log)

  app.run(run, flags_parser=_parse_flags)
