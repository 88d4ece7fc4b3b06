r"""robust_gate's main job: experts, robust gate, baselines, evaluation.

  python launch/main.py --workdir=/tmp/robust_gate
  python launch/main.py --workdir=/tmp/rg_digits --config=launch/configs/digits.py
  python launch/main.py --workdir=/tmp/rg --config.gate.steps=3000

Writes results.json, lambda.png, domain_losses.png, gate_usage.png and the
expert caches into --workdir, and prints the per-domain table.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from robust_gate import pipeline
from robust_gate.checks import InputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs/wordfreq.py"),
    "Experiment configuration.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, log=lambda s: print(s, flush=True))
  except InputError as e:  # a user-caused problem: its message, no traceback
    sys.exit(f"robust_gate: {e}")


if __name__ == "__main__":
  app.run(main)
