"""Synthetic Markov-chain domains with exact entropies: L_k is the exact KL."""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "wordfreq.py"))
  c.data.name = "markov"
  c.data.max_len = 18  # BOS + 16 tokens + EOS
  c.data.options = {
    "num_domains": 4,
    "num_states": 8,
    "seq_len": 16,
    "examples_per_split": (2000, 1000, 1000),
  }
  c.baseline = "entropy"  # b_k = H(D_k), known exactly
  return c
