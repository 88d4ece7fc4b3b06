r"""The finite-space demo: the robust gating game next to its exact solution.

Solves a random finite game with the primal-dual algorithm (robust_gate.finite)
and prints it next to the exact minimax solution of an independent convex solver
(robust_gate.reference); writes results.json.

  python launch/finite_demo.py --workdir=/tmp/finite_demo
  python launch/finite_demo.py --workdir=/tmp/fd --config.num_domains=5 --config.uncertainty=box
"""

import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from robust_gate import files, finite, objectives, provenance, reference, uncertainty
from robust_gate.checks import InputError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "configs/finite_demo.py"),
  "Experiment configuration.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json.", required=True)


def run_demo(config) -> dict:
  """Solves one finite game both ways; returns the results dict."""
  probs, logp = finite.random_instance(
    config.seed, config.num_domains, config.num_points, perturbed=config.perturbed
  )
  lam_set = uncertainty.from_config(config, config.num_domains)
  sol = finite.solve(
    probs,
    logp,
    uncertainty=lam_set,
    gate=config.gate,
    steps=config.steps,
    seed=config.seed,
    primal_lr=config.primal_lr,
    dual_lr=config.dual_lr,
    baseline=config.baseline,
    batch_size=config.batch_size or None,
  )
  b = objectives.finite_baselines(config.baseline, probs, logp)
  exact = reference.solve_exact(probs, logp, np.asarray(b, np.float64), lam_set)
  return {
    "units": "nats",
    "uncertainty": lam_set.kind,
    "game": {
      "worst_case": sol.worst_case,
      "mixture_worst_case": sol.mixture_worst_case,
      "domain_loss": sol.domain_loss.tolist(),
      "lambda_bar": sol.lam_avg.tolist(),
      "lambda_last": sol.lam_last.tolist(),
      "model_mass": float(sol.model_probs.sum()),
    },
    "exact": {"worst_case": exact.value, "domain_loss": exact.domain_loss.tolist()},
    "relative_gap": (sol.worst_case - exact.value) / abs(exact.value),
  }


def format_table(results: dict) -> str:
  g, e = results["game"], results["exact"]
  rows = [
    f"{'':24s}{'primal-dual':>14s}{'exact':>14s}",
    f"{'worst case over Λ':24s}{g['worst_case']:14.6f}{e['worst_case']:14.6f}",
  ]
  for k, (a, b) in enumerate(zip(g["domain_loss"], e["domain_loss"])):
    rows.append(f"{f'L_{k} (nats)':24s}{a:14.6f}{b:14.6f}")
  rows += [
    f"{'max_λ KL(D_λ‖p)':24s}{g['mixture_worst_case']:14.6f}",
    f"{'λ̄':24s}  " + " ".join(f"{x:.3f}" for x in g["lambda_bar"]),
    f"{'Σ_x p(x)':24s}{g['model_mass']:14.10f}",
    f"relative gap to the exact minimax value: {results['relative_gap']:+.2e}",
  ]
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    results = run_demo(config)
  except InputError as e:  # a user-caused problem: its message, no traceback
    sys.exit(f"robust_gate: {e}")
  print(format_table(results))
  path = os.path.join(_WORKDIR.value, "results.json")
  files.write_json(path, {**results, "provenance": provenance.collect(config).to_dict()})
  logging.info("wrote %s", path)


if __name__ == "__main__":
  app.run(main)
