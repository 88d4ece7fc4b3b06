r"""Sweep: the primal-dual game against the exact minimax value on random finite games.

For each dual step size, each K, N, expert kind (exact / perturbed) and Λ (simplex /
box), solve one random game both ways and report the relative gap of the game's
worst case to the exact minimax value. Prints a table and writes sweep.json.

  python launch/finite_sweep.py --workdir=/tmp/sweep --dual_lrs=0.1,1.0
"""

import os
import time

import numpy as np
from absl import app, flags

from robust_gate import files, finite, objectives, provenance, reference, uncertainty

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_DUAL_LRS = flags.DEFINE_list("dual_lrs", ["0.1", "1.0"], "Dual step sizes η.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Primal-dual steps per game.")
_GATE = flags.DEFINE_enum("gate", "tabular", finite.GATES, "Gate family.")


def main(argv):
  del argv
  rows = []
  for dual_lr in map(float, _DUAL_LRS.value):
    for K, N in [(2, 8), (2, 64), (3, 20), (3, 64), (5, 8), (5, 64)]:
      for perturbed in (False, True):
        for kind in ("simplex", "box"):
          seed = 1000 * K + N + 7 * perturbed
          probs, logp = finite.random_instance(seed, K, N, perturbed=perturbed)
          lam_set = (
            uncertainty.simplex(K)
            if kind == "simplex"
            else uncertainty.box(np.full(K, 0.5 / K), np.full(K, 2.0 / K))
          )
          start = time.perf_counter()
          sol = finite.solve(
            probs, logp, uncertainty=lam_set, gate=_GATE.value, steps=_STEPS.value, dual_lr=dual_lr
          )
          seconds = time.perf_counter() - start
          b = np.asarray(objectives.entropy(probs), np.float64)
          exact = reference.solve_exact(probs, logp, b, lam_set).value
          rows.append(
            dict(
              dual_lr=dual_lr,
              K=K,
              N=N,
              perturbed=perturbed,
              set=kind,
              game=sol.worst_case,
              exact=exact,
              rel_gap=(sol.worst_case - exact) / exact,
              lam_in_set=bool(lam_set.contains(sol.lam_avg)),
              seconds=seconds,
            )
          )
          r = rows[-1]
          print(
            f"η={dual_lr:<5} K={K} N={N:<3} {'perturbed' if perturbed else 'exact':9s} "
            f"{kind:8s} game {r['game']:.5f} exact {exact:.5f} "
            f"gap {r['rel_gap']:+.2e} λ̄∈Λ {r['lam_in_set']} {seconds:.1f}s"
          )
  print("\nmax relative gap by η:")
  for dual_lr in sorted({r["dual_lr"] for r in rows}):
    gaps = [r["rel_gap"] for r in rows if r["dual_lr"] == dual_lr]
    print(f"  η={dual_lr}: max {max(gaps):+.2e}, median {np.median(gaps):+.2e}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  files.write_json(
    os.path.join(_WORKDIR.value, "sweep.json"),
    {"rows": rows, "provenance": provenance.collect().to_dict()},
  )


if __name__ == "__main__":
  app.run(main)
