"""A seconds-long end-to-end run for tests: tiny Markov domains and models."""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "synthetic.py"))
  c.data.max_len = 8
  c.data.options = {
    "num_domains": 3,
    "num_states": 4,
    "seq_len": 6,
    "examples_per_split": (60, 40, 40),
  }
  for m in (c.expert, c.monolithic_large):
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 16, 1, 2, 32
  c.monolithic_large.d_model = 32
  c.expert.steps = c.monolithic.steps = c.monolithic_large.steps = 30
  c.expert.per_domain = c.monolithic.per_domain = 8
  c.gate.steps = 40
  c.distill.steps = 20
  c.distill.per_domain = 8  # divisible by 8 devices (tests/test_parallel.py)
  c.gate.per_domain = 8
  c.checkpoint_every = 10
  return c
