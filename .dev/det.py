"""Run-to-run determinism of training: same data, same seeds, same parameters?

Trains the expert-sized transformer of launch/configs/wordfreq_large.py (d_model 256,
4 layers, 8 heads, d_ff 1024, bfloat16 compute) on random tokens (vocabulary V=64,
sequence length T=16, 6 domains drawn from a fixed numpy seed), through the library's
own path (train.make_game + train.fit, as phases.train_monoliths / train_experts do):

  part 1 "monolithic": one model, train.monolithic_loss_fn, 6 domains x 256 seqs/step;
  part 2 "experts":    six stacked experts, train.expert_loss_fn, 256 seqs/expert/step.

Prints a JSON line with the JAX version, devices and XLA_FLAGS, then one per part:
{"part", "sha1" (first 12 hex of SHA-1 over every parameter leaf's bytes, tree order),
"last_loss" (mean per-domain loss of the last step), "seconds" (wall time, compile
included)}. The persistent compilation cache is off, so each process compiles afresh.

Run it twice, in separate processes, and compare the sha1 values (equal = bitwise
deterministic; on CPU they should match):

  PYTHONPATH=src python3 .dev/det.py [--steps 200]
  XLA_FLAGS=--xla_gpu_autotune_level=0 PYTHONPATH=src python3 .dev/det.py

On one H200 (jax 0.11.2) the monolithic digest differed between processes by default
and repeated with autotuning off; --xla_gpu_deterministic_ops=true stopped that jaxlib
at start-up (BUILD_NOTES, session 19).
"""

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # no persistent cache, from the env either

import jax
import numpy as np

jax.config.update("jax_compilation_cache_dir", None)
jax.config.update("jax_enable_compilation_cache", False)

from robust_gate import config_files, models, phases  # noqa: E402
from robust_gate import data as data_lib  # noqa: E402
from robust_gate import train as train_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, T, K, POOL = 64, 16, 6, 4096  # vocabulary, length, domains, sequences per domain


def random_data(seed: int = 0) -> data_lib.DomainData:
  """K domains of POOL random sequences (lengths 1..T-1, tokens 1..V-1), fixed seed."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T, size=K * POOL)
  seqs = [rng.integers(1, V, size=n) for n in lengths]
  domain_N = np.repeat(np.arange(K), POOL)
  return data_lib.encode(seqs, domain_N, [f"d{k}" for k in range(K)], V, T)


def digest(params) -> str:
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(jax.device_get(params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:12]


def run(part: str, loss_fn, params, section, steps: int, seed: int) -> None:
  start = time.perf_counter()
  step, state = train_lib.make_game(
    loss_fn, params, num_domains=K, lr=section.lr, dual_lr=0.0, seed=seed
  )
  state, history = train_lib.fit(
    step, state, steps, name=part, log=lambda s: print(s, file=sys.stderr), chunk=steps
  )
  sha1 = digest(state.params)  # device_get: waits for the last step
  line = {
    "part": part,
    "sha1": sha1,
    "last_loss": float(np.mean(history["losses"][-1])),
    "seconds": round(time.perf_counter() - start, 2),
  }
  print(json.dumps(line), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--config", default=os.path.join(ROOT, "launch/configs/wordfreq_large.py"))
  args = parser.parse_args()
  info = {
    "jax": jax.__version__,
    "devices": [str(d) for d in jax.devices()],
    "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
  }
  print(json.dumps(info), flush=True)

  c = config_files.load(args.config)
  c.data.max_len = T
  cfg = phases.lm_config(c.expert, V, T, c.dtype)  # expert-sized; V, T overridden
  d = random_data(c.seed)
  init = lambda phase: jax.random.fold_in(jax.random.PRNGKey(c.seed), phase)  # phases._init_key

  mc = c.monolithic
  loss = train_lib.monolithic_loss_fn(cfg, d, mc.per_domain, np.zeros(K, np.float32))
  run("monolithic", loss, models.init_lm(cfg, init(3)), mc, args.steps, c.seed)

  ec = c.expert
  loss = train_lib.expert_loss_fn(cfg, d, ec.per_domain)
  run("experts", loss, models.init_stacked_lm(cfg, init(1), K), ec, args.steps, c.seed)


if __name__ == "__main__":
  main()
