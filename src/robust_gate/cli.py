"""The shared body of the absl launchers in launch/: flags, errors, output.

Every launcher is `cli.main(phase_fn, default_config)`: `--config` (an
ml_collections config file, overridable field by field: `--config.gate.steps=3000`)
and `--workdir`. A problem the user caused (bad config, bad data, a workdir from
another run, a disk that is full or read-only) ends with one line naming it, not
a traceback; what was already saved in the workdir is left as it was.
"""

import errno
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from robust_gate import parallel
from robust_gate.checks import InputError


def main(phase, default_config: str) -> None:
  """Defines --config/--workdir and runs `phase(config, workdir, log)` under absl."""
  config = config_flags.DEFINE_config_file(
    "config", default_config, "Experiment configuration file.", lock_config=True
  )
  workdir = flags.DEFINE_string("workdir", None, "Output directory (resumable).", required=True)
  coordinator = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0; with "
    "--num_processes and --process_id, calls jax.distributed.initialize.",
  )
  num_processes = flags.DEFINE_integer("num_processes", None, "Multi-host: processes.")
  process_id = flags.DEFINE_integer("process_id", None, "Multi-host: this process.")
  distributed = flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: jax.distributed.initialize() with the "
    "cluster's own settings (Cloud TPU, SLURM, ...) for flags not given.",
  )

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)  # tfds' notes on custom configs are noise
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tfds.disable_progress_bar()
    import jax  # pylint: disable=g-import-not-at-top

    if distributed.value or coordinator.value:
      jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    log = (lambda s: print(s, flush=True)) if parallel.is_main() else (lambda s: None)
    try:
      phase(config.value, workdir.value, log=log)
    except InputError as e:
      sys.exit(f"robust_gate: {e}")
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        sys.exit(
          f"robust_gate: cannot write to the workdir {workdir.value!r}: "
          f"{os.strerror(e.errno)} ({e.filename or ''}). Files already saved "
          f"there are intact; free space or fix permissions and run the same "
          f"command again to resume."
        )
      raise

  try:
    app.run(run)
  except (AttributeError, KeyError) as e:  # an override naming no config field
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    name = str(e).strip("'\"")
    sys.exit(
      f"robust_gate: unknown config field '{name}' in {' '.join(overrides)}; every "
      f"field is listed, with a comment, in launch/configs/wordfreq.py."
    )
