"""A new domain's expert added to a fitted gate: warm start vs from scratch.

A gate is fitted on K−1 domains and their experts; then the K-th domain and its
expert are added, and the gate over all K is fitted again, once from the old gate
(`expand_gate`) and once from a fresh initialization.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from robust_gate import gate_edits, models, phases
from robust_gate.experiments import common, reporting
from robust_gate.records import Scored


def expand_gate(old_params, new_params):
  """Warm start: the gate on K − 1 domains as a gate on K, the new expert last
  (gate_edits.remap_gate: every old weight copied to its place, the new expert's at 0)."""
  num_old = old_params["params"]["Dense_1"]["bias"].shape[0]
  return gate_edits.remap_gate(old_params, range(num_old), range(num_old + 1), new_params)


def restrict(s: Scored, domains: list[int]) -> Scored:
  """The examples of `domains` scored by those domains' experts, relabelled
  0..len(domains)−1 in that order."""
  d = s.data
  idx = np.flatnonzero(np.isin(d.domain_N, domains))
  label = np.full(d.num_domains, -1, np.int32)
  label[domains] = np.arange(len(domains))
  data = dataclasses.replace(
    d.subset(idx), domain_N=label[d.domain_N[idx]], domains=tuple(d.domains[k] for k in domains)
  )
  return Scored(data, s.cache_NxTxM[idx][..., domains], np.asarray(s.baseline_K)[domains])


def run(config, workdir: str, log=print, new_domain: int = -1) -> dict:
  """For every seed: a gate on the other domains, then the gate on all of them fitted
  from it (warm start) and from that seed's fresh initialization (from scratch)."""
  _, m = common.load(config, workdir)
  data, te = common.gate_data(m.caches), m.caches.test
  K, V = te.data.num_domains, te.data.vocab_size
  new = new_domain % K
  old = [k for k in range(K) if k != new]
  order = [*old, new]  # the new expert and domain last
  old_cfg, new_cfg = phases.gate_config(config, K - 1, V), phases.gate_config(config, K, V)
  out: dict[str, Any] = {
    **common.seeded(config),
    "new_domain": te.data.domains[new],
    "old_domains": [te.data.domains[k] for k in old],
  }

  def fit(t, cfg, domains, **kw):
    part = data.restrict(lambda s: restrict(s, domains))
    test = {"test": restrict(te, domains)}
    chunk = config.checkpoint_every
    return common.fit_gate(t, cfg, part.fit, test, chunk=chunk, log=log, dual_on=part.dual, **kw)

  per_seed: list[dict[str, Any]] = []  # {"old_gate_late_worst": late, run name: curve}
  for seed in out["seeds"]:
    t = common.gate_training(config, seed)
    st_old, curve_old = fit(t, old_cfg, old, name=f"gate on {K - 1} domains seed={seed}")
    fresh = models.init_gate(new_cfg, jax.random.fold_in(jax.random.PRNGKey(seed), 2))
    runs: dict[str, Any] = {"old_gate_late_worst": common.late(curve_old, "test")[0]}
    for name, init in (
      ("warm start", expand_gate(st_old.ema_params, fresh)),
      ("from scratch", fresh),
    ):
      label = f"gate on {K} domains, {name}, seed={seed}"
      runs[name] = fit(t, new_cfg, order, name=label, params=init)[1]
    per_seed.append(runs)
  out["gate_on_old_domains_late_worst"] = common.spread(
    [r["old_gate_late_worst"] for r in per_seed]
  )
  out["runs"] = {}
  for name in ("warm start", "from scratch"):
    curves = [r[name] for r in per_seed]
    targets = [common.late(r["from scratch"], "test")[0] for r in per_seed]
    hits = [
      next((c["step"] for c in curve if max(c["test"]) <= target), None)
      for curve, target in zip(curves, targets)
    ]
    out["runs"][name] = {
      "steps": [c["step"] for c in curves[0]],
      "late_worst": common.spread([common.late(c, "test")[0] for c in curves]),
      "worst": common.spread([common.worst_curve(c, "test") for c in curves]),
      # Per seed: the first evaluation at or below that seed's from-scratch late mean.
      "first_step_at_or_below_scratch_late_mean": hits,
    }
  runs = out["runs"]
  rows = [
    (
      n,
      [
        r["worst"]["mean"][0],
        r["worst"]["mean"][1],
        r["late_worst"]["mean"],
        r["late_worst"]["sd"],
        " ".join(map(str, r["first_step_at_or_below_scratch_late_mean"])),
      ],
    )
    for n, r in runs.items()
  ]
  first = runs["warm start"]["steps"][1]
  log(
    f"extend (add {out['new_domain']}; worst-case bits/token on all {K} domains, mean over "
    f"{len(out['seeds'])} seeds):\n"
    + reporting.table(
      rows, ["at step 0", f"step {first}", "late mean", "late sd", "first ≤ scratch"]
    )
  )
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  for n, r in runs.items():
    mean, sd = np.asarray(r["worst"]["mean"]), np.asarray(r["worst"]["sd"])
    ax.plot(r["steps"], mean, "o-", label=n)
    ax.fill_between(r["steps"], mean - sd, mean + sd, alpha=0.2)
  ax.set(
    xlabel="gate steps after adding the domain",
    ylabel="test worst-case L_k (bits/token)",
    title=f"adding {out['new_domain']}'s expert (mean ± sd over {len(out['seeds'])} seeds)",
    yscale="log",
  )
  ax.legend()
  return reporting.write(config, workdir, "extend", out, fig)
