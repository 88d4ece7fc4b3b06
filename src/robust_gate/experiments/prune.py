"""Experts with little gate mass under λ̄ dropped, the gate refitted: the
worst case against the experts' cost."""

from typing import Any

import numpy as np

from robust_gate import experts, phases
from robust_gate.experiments import common, reporting


def run(config, workdir: str, log=print, threshold: float = 0.02) -> dict:
  """Drop experts with gate mass < threshold under λ̄; refit the gate on the rest.

  The whole pruning path is measured (refit on all M, drop the least-used expert,
  refit, repeat), so the cost of pruning is visible where nothing falls under the
  threshold. Worst cases are means over the second half of each refit (`late`).
  """
  results, m = common.load(config, workdir)
  va, te = m.caches.validation, m.caches.test
  domains = results["domains"]
  lam = np.array([results["lambda_bar"][d] for d in domains])
  usage = np.asarray(results["gate_usage"]["robust_gate"])  # [K domains, M experts]
  mass = lam @ usage
  M = len(mass)
  expert_flops = 2 * experts.num_params(m.experts.params) / M
  t = common.gate_training(config)
  path: list[dict[str, Any]] = []
  keep = list(range(M))
  while keep:
    _, curve = common.fit_gate(
      t,
      phases.gate_config(config, len(keep), va.data.vocab_size),
      va.only_experts(keep),
      {"test": te.only_experts(keep)},
      chunk=config.checkpoint_every,
      log=log,
      name=f"gate on {len(keep)} experts",
    )
    worst, worst_sd = common.late(curve, "test")
    path.append(
      {
        "experts": [domains[j] for j in keep],
        "test_worst": worst,
        "test_worst_sd": worst_sd,
        "expert_flops_per_token": expert_flops * len(keep),
      }
    )
    keep = [j for j in keep if j != min(keep, key=lambda j: mass[j])]
  below = [domains[j] for j in range(M) if mass[j] < threshold]
  out = {
    "threshold": threshold,
    "mass_under_lambda_bar": dict(zip(domains, mass.tolist())),
    "pruned_at_threshold": below,
    "path": path,
  }
  log(
    "prune: gate mass under λ̄ "
    + ", ".join(f"{d}={x:.3f}" for d, x in zip(domains, mass))
    + f"; below {threshold}: {below or 'none'}"
  )
  cost = lambda p: p["expert_flops_per_token"] / path[0]["expert_flops_per_token"]
  rows = [(f"{len(p['experts'])} experts", [p["test_worst"], cost(p)]) for p in path]
  log(reporting.table(rows, ["test worst", "expert cost"]))
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  ax.plot([len(p["experts"]) for p in path], [p["test_worst"] for p in path], "o-")
  ax.set(
    xlabel="experts kept (least gate mass under λ̄ dropped first)",
    ylabel="test worst-case L_k (bits/token)",
    title="pruning",
    yscale="log",
  )
  return reporting.write(config, workdir, "prune", out, fig)
