"""Item 3 of issue 8: three small Markov domains whose divergence is dialed by
`data.options.similarity` (set per run by `launch/experiment.py --experiment=jsd`).

4 states and 7 tokens per sequence: 4^7 = 16384 sequences, so every KL and JSD is
computed exactly by enumeration. Models are small, so the monolithic model's
capacity is what the domains compete for.
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "synthetic.py"))
  c.data.max_len = 9  # BOS + 7 tokens + EOS
  c.data.options = {
    "num_domains": 3,
    "num_states": 4,
    "seq_len": 7,
    "examples_per_split": (1500, 600, 600),
    "similarity": 0.0,
  }
  for m in (c.expert, c.monolithic_large):
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 16, 1, 2, 32
  c.monolithic_large.d_model = 32
  c.expert.steps = c.monolithic.steps = 600
  c.monolithic_large.steps = 300
  c.gate.steps = 600
  c.distill.steps = 100
  c.checkpoint_every = 100
  return c
