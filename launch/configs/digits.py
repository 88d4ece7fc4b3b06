"""scikit-learn digits as 64-token pixel sequences; domains = groups of digit classes."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import wordfreq as base  # noqa: E402  (the default config, edited below)


def get_config():
  c = base.get_config()
  c.data.name = "digits"
  c.data.max_len = 66  # BOS + 64 pixels + EOS
  c.data.options = {"groups": ((0, 6), (1, 7), (2, 3), (4, 9), (5, 8))}  # the domains
  c.expert.per_domain = 16
  c.monolithic.per_domain = 16
  c.gate.per_domain = 32
  return c
