"""scikit-learn digits as 64-token pixel sequences; domains = groups of digit classes."""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "wordfreq.py"))
  c.data.name = "digits"
  c.data.max_len = 66  # BOS + 64 pixels + EOS
  c.data.options = {"groups": ((0, 6), (1, 7), (2, 3), (4, 9), (5, 8))}  # the domains
  c.expert.per_domain = 16
  c.monolithic.per_domain = 16
  c.gate.per_domain = 32
  return c
