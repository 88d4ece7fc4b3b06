"""The source-file job for one H200: five domains, 25.6M-parameter experts, T = 256.

Every phase in one launch of 8 to 9 minutes on one H200 (runs at f9e5f4f, 6762001 and
de945eb: 8 min 20 s, 7 min 51 s, 9 min 2 s; per-phase and per-model seconds on the
results page, docs/results.md; the seconds below are f9e5f4f's). Sizes:
  experts            d 512 × 8 layers × d_ff 2048, 500 steps of 5 × 128 sequences
                     (82M expert-tokens; 66 s measured)
  monolithic, DRO    an expert's size, the same batch (5 × 128) and steps (57 s, 66 s)
  monolithic_large   d 1024 × 10 layers, 127M ≈ 5 experts; 250 steps of 5 × 64
                     sequences, at least the experts' compute (56 s)
  distill            500 steps of 5 × 64 sequences, the teacher run on the fly (68 s),
                     the domains weighted uniformly (config.distill.weights)
  gates              3 × 3000 steps of 5 × 256 cached sequences (caches 9 s, gates 17 s)
Compilation, data loading, checkpoints and evaluation (77 s) take the rest.
Data: 4 MB train, 0.5 MB validation and test per domain where the environment has
it (cython and prose have about 2.6 and 1.7 MB in all); 21 MB prepared (measured).
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "source_small.py"))
  c.dtype = "bfloat16"
  c.checkpoint_every = 250  # one scan length for every model; ~1.5 GB a checkpoint
  c.data.options["max_bytes_per_domain"] = 5_000_000  # 4 MB train, 0.5 validation, 0.5 test
  c.data.options["max_bytes_per_file"] = 65536
  e = c.expert
  e.d_model, e.num_layers, e.num_heads, e.d_ff = 512, 8, 8, 2048
  e.steps, e.per_domain, e.lr = 500, 128, 6e-4  # 128 per expert: the MFU needs it
  c.monolithic.steps, c.monolithic.per_domain, c.monolithic.lr = 500, 128, 6e-4
  large = c.monolithic_large
  large.d_model, large.num_layers, large.num_heads, large.d_ff = 1024, 10, 16, 4096
  # 320 sequences a step (at 640 its activations asked for a 76 GiB buffer) × 250 steps
  # × 127M parameters ≥ the experts' 500 × 640 × 25.6M: at least their compute.
  large.steps, large.per_domain, large.lr = 250, 64, 3e-4
  c.gate.hidden, c.gate.steps, c.gate.per_domain = 64, 3000, 256
  c.distill.steps, c.distill.per_domain, c.distill.lr = 500, 64, 5e-4
  return c
