"""Experts with little gate mass under λ̄ dropped, the gate refitted: the
worst case against the experts' cost."""

from typing import Any

import numpy as np

from robust_gate import evaluate, experts, phases
from robust_gate.experiments import common, reporting
from robust_gate.records import Gate, Scored


def expert_mass(gate: Gate, on: Scored) -> np.ndarray:
  """Each expert's gate mass under the gate's λ̄, measured on `on`, [M]:
  Σ_k λ̄_k · (the mean gate weight of expert j over domain k's tokens)."""
  _, usage_KxM = evaluate.gate_logprobs_and_usage(gate.cfg, gate.params, on.data, on.cache_NxTxM)
  lam_K = np.asarray(gate.state.lam_avg_K, np.float64)
  return (lam_K / lam_K.sum()) @ usage_KxM


def run(config, workdir: str, log=print, threshold: float = 0.02) -> dict:
  """Drop experts with gate mass < threshold under λ̄; refit the gate on the rest.

  The order is chosen on validation (`common.GateData.selection`): the main job's robust
  gate's mass on each expert there, least first; test is only the outcome. The whole
  pruning path is measured (refit on all M, drop the least-used expert, refit,
  repeat), each refit over every seed, so the cost of pruning is visible where nothing
  falls under the threshold. Worst cases are means over the second half of each refit
  (`late`).
  """
  _, m = common.load(config, workdir)
  data, te = common.gate_data(m.caches), m.caches.test
  names = list(te.data.domains)  # expert j is domain j's
  mass = expert_mass(m.gates.robust_gate, data.selection)
  M = len(mass)
  expert_flops = 2 * experts.num_params(m.experts.params) / M
  out: dict[str, Any] = {
    **common.seeded(config),
    "threshold": threshold,
    "order_chosen_on": data.selection_is,
    "mass_under_lambda_bar": dict(zip(names, mass.tolist())),
    "pruned_at_threshold": [names[j] for j in range(M) if mass[j] < threshold],
    "path": [],
  }
  keep = list(range(M))
  while keep:
    part = data.restrict(lambda s, keep=keep: s.only_experts(keep))
    per_seed = []
    for seed in out["seeds"]:
      _, curve = common.fit_gate(
        common.gate_training(config, seed),
        phases.gate_config(config, len(keep), te.data.vocab_size),
        part.fit,
        {"validation": part.selection, "test": te.only_experts(keep)},
        chunk=config.checkpoint_every,
        log=log,
        name=f"gate on {len(keep)} experts seed={seed}",
        dual_on=part.dual,
      )
      per_seed.append({s: common.late(curve, s)[0] for s in ("validation", "test")})
    out["path"].append(
      {
        "experts": [names[j] for j in keep],
        "expert_flops_per_token": expert_flops * len(keep),
        **{f"{s}_worst": v for s, v in common.across_seeds(per_seed).items()},
      }
    )
    keep = [j for j in keep if j != min(keep, key=lambda j: mass[j])]
  path = out["path"]
  log(
    "prune: gate mass under λ̄ (on validation) "
    + ", ".join(f"{d}={x:.3f}" for d, x in zip(names, mass))
    + f"; below {threshold}: {out['pruned_at_threshold'] or 'none'}"
  )
  cost = lambda p: p["expert_flops_per_token"] / path[0]["expert_flops_per_token"]
  rows = [
    (f"{len(p['experts'])} experts", [p["test_worst"]["mean"], p["test_worst"]["sd"], cost(p)])
    for p in path
  ]
  log(reporting.table(rows, ["test worst", "test sd", "expert cost"]))
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  ax.errorbar(
    [len(p["experts"]) for p in path],
    [p["test_worst"]["mean"] for p in path],
    yerr=[p["test_worst"]["sd"] for p in path],
    fmt="o-",
    capsize=3,
  )
  ax.set(
    xlabel="experts kept (least gate mass under λ̄ on validation dropped first)",
    ylabel="test worst-case L_k (bits/token)",
    title=f"pruning (mean ± sd over {len(out['seeds'])} seeds)",
    yscale="log",
  )
  return reporting.write(config, workdir, "prune", out, fig)
