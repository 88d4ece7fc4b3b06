"""The installed Python environment's files as five domains of 255-byte windows (2-core CPU).

Domains: kinds of file (robust_gate.datasets_source), 200 KB of windows each. The
models are wordfreq.py's; the batches and steps are smaller, for 16× longer sequences.
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "wordfreq.py"))
  c.data.name = "source"
  c.data.max_len = 256  # BOS + a 255-byte window in; the window + EOS out
  c.data.options = {
    "kinds": ("python", "stubs", "c_cpp", "cython", "prose"),  # the domains
    "seq_len": 255,  # bytes per window
    "max_bytes_per_domain": 200_000,  # 160 KB train, 20 KB validation, 20 KB test
    "max_bytes_per_file": 8192,  # 32 windows: 20 or more train files per domain
  }
  # Steps and batches for a 2-core CPU: measured 21 min wall, 12 min of CPU, with
  # the cores shared by other jobs (experts 0.6 steps/s, monolithic 0.8, student
  # 0.5). Few steps: the experts stay far from converged (2.5 nats/byte).
  c.expert.steps, c.expert.per_domain = 200, 8
  c.monolithic.steps, c.monolithic.per_domain = 200, 8
  c.monolithic_large.steps = 60
  c.gate.steps, c.gate.per_domain = 400, 16
  c.distill.steps, c.distill.per_domain = 60, 4
  return c
