r"""Pre-trained checkpoints as experts: a robust gate, its certificate, an exported student.

  python launch/checkpoints.py --workdir=/tmp/rg_ckpt \
      --config=launch/configs/checkpoints_example.py
  python launch/checkpoints.py --workdir=/tmp/rg_ckpt --config=my_config.py \
      --config.gate.steps=3000
  python launch/checkpoints.py --workdir=/tmp/rg_ckpt --config=my_config.py \
      --config.model_parallel=4     # each expert split over 4 devices when scoring

The config names one checkpoint directory per domain (config.experts) and that
domain's text files (config.data.files). Writes the expert caches, robust_gate/,
erm_gate/, best_response/, student/ (checkpoints, metrics.jsonl), student_hf/ (the
student as a checkpoint transformers loads) and results.json into --workdir, and
prints the worst case of every method. Killed and started again with the same
command, it resumes where it stopped.

--remove_expert=NAME drops an expert and its domain; --add_expert=NAME=DIR adds one
(its text: --add_data=NAME=GLOB[,GLOB...], unless config.data.files has NAME). The
edited job runs in --workdir/edits/<edit>/, its robust gate warm-started from the
one fitted in --workdir (robust_gate.checkpoint_edits).
"""

import os

from absl import flags

from robust_gate import checkpoint_edits, cli

_ADD = flags.DEFINE_multi_string("add_expert", [], "NAME=CHECKPOINT_DIR: an expert to add.")
_DATA = flags.DEFINE_multi_string("add_data", [], "NAME=GLOB[,GLOB]: the added domain's text.")
_REMOVE = flags.DEFINE_multi_string("remove_expert", [], "NAME: an expert to remove.")


def _job(config, workdir, log=print):
  edit = checkpoint_edits.Edit.parse(_ADD.value, _DATA.value, _REMOVE.value)
  return checkpoint_edits.run(config, workdir, edit, log)


if __name__ == "__main__":
  cli.main(_job, os.path.join(os.path.dirname(__file__), "configs/checkpoints_example.py"))
