"""The source-file job for one H200: five domains, 25.6M-parameter experts, T = 256.

A starting point to tune on the device; the whole job is meant to fit in ~9 min.
Rates from docs/performance.md (one H200, bf16, d 512 × 8 layers × d_ff 2048,
vocabulary 256, T 256: 25,597,184 parameters, 164 MFLOP per trained token; 6 experts
× 128 sequences in 88.6 ms, 365 TFLOP/s, about 0.37 of the 990 nominal; the brief's
0.5 × 990 would be 0.33 µs): 0.45 µs per expert-token trained, ~0.15 µs forward.
  experts            600 × 5 × 128 × 256 tokens × 0.45 µs  ≈ 44 s (20M tokens each:
                     5 epochs of a 4 MB domain, 14 of prose's 1.4 MB)
  monolithic, DRO    the same batch (5 × 128 sequences) and steps   ≈ 44 s each
  monolithic_large   d 1024 × 10 layers, 127M ≈ 5 experts, ~4.8× per token:
                     200 × 163,840 tokens × 0.45 µs × 4.8           ≈ 71 s
  distill            600 × 320 sequences: student 0.45 + teacher 5 × 0.15 µs
                     per token, ~0.1 s a step                       ≈ 60 s
  gates              3 × 3000 latency-bound steps of ~2 ms          ≈ 18 s
  caches             2 × 5 × ~1960 sequences, 5 experts forward     ≈ 4 s
About 4.8 min of steps; compilation, checkpoints and evaluation take the rest.
Data: 4 MB train, 0.5 MB validation and test per domain where the environment has
it (cython and prose have about 2.6 and 1.7 MB in all); 21 MB prepared (measured).
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "source_small.py"))
  c.dtype = "bfloat16"
  c.checkpoint_every = 250  # one scan length for every model; 5 experts' parameters and Adam state: ~1.5 GB a checkpoint
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
