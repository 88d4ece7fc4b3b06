"""The wordfreq main job with larger models and batches, for an accelerator.

Six languages of 40,000 training words each; experts of 3.3M parameters; 2,500 steps of
the experts, the expert-sized monolithic and group-DRO models and the student, 5,000 of
each gate; the large monolithic model has about all experts' parameters and as many
steps as give it at least their compute (425 × 6 × 256 words × 20.2M ≥
2,500 × 6 × 256 × 3.3M), as source_h200's does. Compute in bfloat16 (parameters and
optimizer float32), as source_h200. Sized, by time alone, so that the job and
`student_seeds` on it fit one 10-minute device command (BUILD_NOTES, "Session 13"): at
5,000 steps the job alone took 389 s on one H200 and each further seed about 190 s; at
2,500 the job took 317 s and `student_seeds` over 2 seeds 148 s; with a persistent
compilation cache (`JAX_COMPILATION_CACHE_DIR`, which the seeds' models share with the job)
the job took 372 s and `student_seeds` over 3 seeds 142 s.
"""

import os

from robust_gate import config_files


def get_config():
  c = config_files.load(os.path.join(os.path.dirname(__file__), "wordfreq.py"))
  c.data.options.examples_per_split = (40000, 4000, 4000)  # per language
  c.data.options.wordlist_size = 50000
  c.dtype = "bfloat16"
  for m in (c.expert,):
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 256, 4, 8, 1024
    m.steps, m.per_domain, m.lr = 2500, 256, 1e-3
  c.monolithic.steps, c.monolithic.per_domain, c.monolithic.lr = 2500, 256, 1e-3
  # About six experts' parameters (6 × 3.3M ≈ 20M).
  c.monolithic_large.d_model, c.monolithic_large.num_layers = 576, 5
  c.monolithic_large.num_heads, c.monolithic_large.d_ff = 8, 2304
  c.monolithic_large.steps, c.monolithic_large.lr = 425, 5e-4  # ≥ the experts' compute
  c.gate.steps, c.gate.per_domain = 5000, 256
  c.distill.steps, c.distill.per_domain = 2500, 64
  return c
