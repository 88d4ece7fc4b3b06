"""The wordfreq main job with larger models and batches, for an accelerator.

Six languages of 40,000 training words each; experts of 3.3M parameters; 5,000 steps of
every model. One H200 at 2365eb7: 754 s of phases (experts 303, of which training 78 and
reading the prepared dataset into splits most of the rest; gates 38; student 63;
baselines 302; evaluation 48); results in docs/results.md. The experts see each training
word 32 times and overfit it (BUILD_NOTES, "wordfreq_large on one H200").
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "wordfreq.py"))
  c.data.options.examples_per_split = (40000, 4000, 4000)  # per language
  c.data.options.wordlist_size = 50000
  for m in (c.expert,):
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 256, 4, 8, 1024
    m.steps, m.per_domain, m.lr = 5000, 256, 1e-3
  c.monolithic.steps, c.monolithic.per_domain, c.monolithic.lr = 5000, 256, 1e-3
  # About six experts' parameters (6 × 3.3M ≈ 20M).
  c.monolithic_large.d_model, c.monolithic_large.num_layers = 576, 5
  c.monolithic_large.num_heads, c.monolithic_large.d_ff = 8, 2304
  c.monolithic_large.steps, c.monolithic_large.lr = 5000, 5e-4
  c.gate.steps, c.gate.per_domain = 5000, 256
  c.distill.steps, c.distill.per_domain = 5000, 64
  return c
