r"""The paper's claims, measured: one experiment per run.

  python3 launch/experiment.py --experiment=mixtures --workdir=/tmp/rg_main   # after main.py
  python3 launch/experiment.py --experiment=jsd --config=launch/configs/jsd.py --workdir=/tmp/rg_jsd

--experiment is one of mixtures, conflict, jsd, gate_size, prior, extend, prune, ema,
convergence, sequence_gate, student_size, student_seeds (robust_gate.experiments says
what each measures; only the one named is imported). Every experiment but jsd reads
the finished main job in --workdir, run with the same --config; results go to
<workdir>/experiments/<experiment>.json (with the provenance of the numbers) and .png.
What an experiment trains it repeats over --config.experiment_seeds seeds (3 by
default) and reports as mean ± sd.
"""

import os

from absl import flags

from robust_gate import cli
from robust_gate.experiments import EXPERIMENTS, parse_settings

_EXPERIMENT = flags.DEFINE_enum(
  "experiment", None, list(EXPERIMENTS), "Which experiment to run.", required=True
)
_SETTINGS = flags.DEFINE_multi_string(
  "setting",
  [],
  "NAME=VALUE, repeatable: a setting of an experiment that takes them (student_size: "
  "--setting=steps=100 --setting='sizes=(1.0, 2.0)'); VALUE a Python literal.",
)


def run(config, workdir, log):
  kwargs = parse_settings(_SETTINGS.value, _EXPERIMENT.value)
  return EXPERIMENTS[_EXPERIMENT.value](config, workdir, log, **kwargs)


if __name__ == "__main__":
  cli.main(run, os.path.join(os.path.dirname(__file__), "configs", "wordfreq.py"))
