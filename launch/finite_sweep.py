r"""Sweep: the primal-dual game against the exact minimax value on random finite games.

For each dual step size, each K, N, expert kind (exact / perturbed) and Λ (simplex /
box), solve one random game both ways and report the relative gap of the game's
worst case to the exact minimax value. Prints a table and writes sweep.json.

  python launch/finite_sweep.py --workdir=/tmp/sweep --dual_lrs=0.1,1.0

With --mode=timing it times instead the seconds per step of `finite.solve` on one
large random game, exact and with minibatches, and writes timing.json: a step's
cost is the difference of two runs of different lengths over their difference in
steps (each run compiles once, so compilation cancels out).

  python launch/finite_sweep.py --workdir=/tmp/timing --mode=timing --num_points=100000
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
_MODE = flags.DEFINE_enum("mode", "gap", ["gap", "timing"], "gap: the sweep; timing: step cost.")
_NUM_POINTS = flags.DEFINE_integer("num_points", 100_000, "timing: N of the game.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["64"], "timing: minibatch sizes B to time.")


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if _MODE.value == "timing":
    rows = time_steps(_NUM_POINTS.value, [None, *map(int, _BATCH_SIZES.value)], _STEPS.value)
    files.write_json(
      os.path.join(_WORKDIR.value, "timing.json"),
      {"rows": rows, "provenance": provenance.collect().to_dict()},
    )
    return
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
  files.write_json(
    os.path.join(_WORKDIR.value, "sweep.json"),
    {"rows": rows, "provenance": provenance.collect().to_dict()},
  )


def time_steps(num_points: int, batch_sizes, steps: int, K: int = 3) -> list[dict]:
  """Seconds per step of finite.solve on a random game of N points, for each batch
  size (None: exact expectations), from runs of 10 and 10 + `steps` steps."""
  probs, logp = finite.random_instance(0, K, num_points, perturbed=True)
  rows = []
  for batch_size in batch_sizes:
    seconds = []
    for n in (10, 10 + steps):
      start = time.perf_counter()
      finite.solve(probs, logp, gate=_GATE.value, steps=n, batch_size=batch_size)
      seconds.append(time.perf_counter() - start)
    rows.append(
      dict(
        N=num_points,
        K=K,
        gate=_GATE.value,
        batch_size=batch_size,
        steps=10 + steps,
        seconds=seconds[1],
        seconds_per_step=(seconds[1] - seconds[0]) / steps,
      )
    )
    print(
      f"N={num_points} B={batch_size or 'exact':<6} {10 + steps} steps in {seconds[1]:.1f}s: "
      f"{1e3 * rows[-1]['seconds_per_step']:.2f} ms per step"
    )
  return rows


if __name__ == "__main__":
  app.run(main)
