"""L(λ) = Σ_k λ_k L_k of every method on a grid of test mixtures and at λ̄."""

import itertools

import numpy as np

from robust_gate.experiments import common, reporting

ONE_SEED = (
  "1 seed: the main job's models as results.json scores them; this experiment trains "
  "nothing (the other experiments repeat what they train over seeds)"
)


def simplex_grid(K: int, n: int) -> np.ndarray:
  """Every λ on the simplex with coordinates in {0, 1/n, ..., 1}, [G, K]."""
  pts = [c for c in itertools.product(range(n + 1), repeat=K - 1) if sum(c) <= n]
  return np.array([[*list(c), n - sum(c)] for c in pts], np.float64) / n


def run(config, workdir: str, log=print, resolution: int = 4) -> dict:
  """Every method's loss on the simplex grid of `resolution`, from results.json."""
  results = common.results(workdir)
  domains = results["domains"]
  K = len(domains)
  grid = simplex_grid(K, resolution)
  lam_bar = np.array([results["lambda_bar"][d] for d in domains])
  methods = {
    m: np.array([v["domain_loss"][d] for d in domains])
    for m, v in results["methods"].items()
    if not m.startswith("expert:")
  }
  robust = grid @ methods["robust_gate"]
  out = {
    "seeds": [config.seed],
    "seeds_note": ONE_SEED,
    "domains": domains,
    "grid_points": len(grid),
    "resolution": resolution,
    "units": results["units"],
    "methods": {},
  }
  for name, L in methods.items():
    mix = grid @ L
    out["methods"][name] = {
      "grid_worst": float(mix.max()),
      "grid_mean": float(mix.mean()),
      "at_lambda_bar": float(lam_bar @ L),
      "simplex_worst": float(L.max()),
      "gap_to_robust_worst": float(mix.max() - robust.max()),
      "robust_better_fraction": float(np.mean(robust <= mix + 1e-9)),
    }
  cols = (
    "grid_worst",
    "grid_mean",
    "at_lambda_bar",
    "gap_to_robust_worst",
    "robust_better_fraction",
  )
  rows = [(n, [m[k] for k in cols]) for n, m in out["methods"].items()]
  log(
    f"mixtures ({len(grid)} grid points, bits/token):\n"
    + reporting.table(rows, ["grid worst", "grid mean", "at λ̄", "gap vs robust", "robust ≤ it"])
  )
  fig, ax = reporting.plt().subplots(figsize=(7, 4))
  order = np.argsort(robust)
  for name, L in methods.items():
    ax.plot((grid @ L)[order], label=name, lw=2 if name == "robust_gate" else 1)
  ax.set(
    xlabel="test mixture (grid points, sorted by the robust gate's loss)",
    ylabel=f"Σ λ_k L_k ({results['units']})",
    title=f"loss over {len(grid)} test mixtures: {config.data.name}",
  )
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "mixtures", out, fig)
