"""A new domain's expert added to a fitted gate: warm start vs from scratch.

A gate is fitted on K−1 domains and their experts; then the K-th domain and its
expert are added, and the gate over all K is fitted again, once from the old gate
(`expand_gate`) and once from a fresh initialization.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import models, phases
from robust_gate.experiments import common, reporting
from robust_gate.records import Scored


def expand_gate(old_params, new_params):
  """Warm start: every old weight copied; weights the new expert adds start at 0."""

  def one(old, new):
    if old.shape == new.shape:
      return old
    return jnp.zeros_like(new).at[tuple(slice(0, s) for s in old.shape)].set(old)

  return jax.tree_util.tree_map(one, old_params, new_params)


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
  _, m = common.load(config, workdir)
  va, te = m.caches.validation, m.caches.test
  K, V = va.data.num_domains, va.data.vocab_size
  new = new_domain % K
  old = [k for k in range(K) if k != new]
  order = [*old, new]  # the new expert and domain last
  t = common.gate_training(config)
  fit = lambda cfg, train, test, **kw: common.fit_gate(
    t, cfg, train, {"test": test}, chunk=config.checkpoint_every, log=log, **kw
  )
  old_cfg, new_cfg = phases.gate_config(config, K - 1, V), phases.gate_config(config, K, V)
  st_old, curve_old = fit(
    old_cfg, restrict(va, old), restrict(te, old), name=f"gate on {K - 1} domains"
  )
  fresh = models.init_gate(new_cfg, jax.random.fold_in(jax.random.PRNGKey(t.seed), 2))
  runs: dict[str, dict[str, Any]] = {}
  for name, init in (
    ("warm start", expand_gate(st_old.ema_params, fresh)),
    ("from scratch", fresh),
  ):
    _, curve = fit(
      new_cfg,
      restrict(va, order),
      restrict(te, order),
      name=f"gate on {K} domains, {name}",
      params=init,
    )
    runs[name] = {
      "curve": [(c["step"], max(c["test"])) for c in curve],
      "late_worst": common.late(curve, "test"),
    }
  target = runs["from scratch"]["late_worst"][0]
  for r in runs.values():
    hit = [s for s, v in r["curve"] if v <= target]
    r["first_step_at_or_below_scratch_late_mean"] = hit[0] if hit else None
  domains = va.data.domains
  out = {
    "new_domain": domains[new],
    "old_domains": [domains[k] for k in old],
    "gate_on_old_domains_late_worst": common.late(curve_old, "test"),
    "runs": runs,
  }
  rows = [
    (
      n,
      [
        r["curve"][0][1],
        r["curve"][1][1],
        r["late_worst"][0],
        str(r["first_step_at_or_below_scratch_late_mean"]),
      ],
    )
    for n, r in runs.items()
  ]
  log(
    f"extend (add {domains[new]}; worst-case bits/token on all {K} domains):\n"
    + reporting.table(
      rows, ["at step 0", f"step {r['curve'][1][0]}", "late mean", "first ≤ scratch"]
    )
  )
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  for n, r in runs.items():
    ax.plot(*zip(*r["curve"]), "o-", label=n)
  ax.set(
    xlabel="gate steps after adding the domain",
    ylabel="test worst-case L_k (bits/token)",
    title=f"adding {domains[new]}'s expert",
    yscale="log",
  )
  ax.legend()
  return reporting.write(config, workdir, "extend", out, fig)
