r"""Phase 1: train the K experts (expert k on domain k), with checkpoints.

  python launch/train_experts.py --workdir=/tmp/robust_gate [--config=launch/configs/digits.py]

Reads what the earlier phases wrote in --workdir (see launch/main.py for the
order); started again with the same command it resumes from its checkpoints.
"""

import os

from robust_gate import cli, pipeline

if __name__ == "__main__":
  cli.main(pipeline.train_experts, os.path.join(os.path.dirname(__file__), "configs/wordfreq.py"))
