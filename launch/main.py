r"""robust_gate's main job: every phase in order, in one --workdir.

  python launch/main.py --workdir=/tmp/robust_gate
  python launch/main.py --workdir=/tmp/rg_digits --config=launch/configs/digits.py
  python launch/main.py --workdir=/tmp/rg --config.gate.steps=3000

The phases, each also a launcher of its own: train_experts, train_gate, distill,
train_baselines, evaluate. Writes results.json, lambda.png, domain_losses.png,
gate_usage.png, the expert caches and one directory per trained model
(checkpoints, metrics.jsonl) into --workdir, and prints the per-domain table.
Killed and started again with the same command, it resumes where it stopped.
"""

import os

from robust_gate import cli, pipeline

if __name__ == "__main__":
  cli.main(pipeline.run, os.path.join(os.path.dirname(__file__), "configs/wordfreq.py"))
