"""The gate reported as an EMA of w (docs/math.md §4) against the last iterate."""

import dataclasses

from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting

CHOSEN_ON = (
  "the decay with the lowest mean late worst case on validation (never test); reported, "
  "not applied to the config"
)


def run(config, workdir: str, log=print, decays=(0.0, 0.9, 0.99, 0.998), points=30) -> dict:
  """The robust gate refitted at each EMA decay (0: the last iterate) and seed.

  The EMA does not feed back into training, so for one seed every decay sees the
  same trajectory of w and λ: the runs differ only in which gate is read off. Each
  is evaluated on its fit data, on validation (`common.GateData.selection`) and on test
  at `points` steps; `late` gives the mean and spread of the worst case over the
  second half (what the last iterate's oscillation makes noisy), and the spread of
  each over seeds (config.seed + s; the experts stay those of the main job) is the
  draw a single run reports.
  """
  _, m = common.load(config, workdir)
  data, te = common.gate_data(m.caches), m.caches.test
  cfg = m.gates.robust_gate.cfg
  lam_set = uncertainty_lib.from_config(config, te.data.num_domains)
  evals = {"fit": data.fit, "validation": data.selection, "test": te}
  out: dict = {
    **common.seeded(config),
    "decays": list(decays),
    "steps": config.gate.steps,
    "validation_is": data.selection_is,
    "runs": [],
    "summary": {},
  }
  per_seed: dict[float, list[dict]] = {d: [] for d in decays}  # each run's numbers
  for seed in out["seeds"]:
    for decay in decays:
      t = dataclasses.replace(common.gate_training(config, seed), ema_decay=decay)
      _, curve = common.fit_gate(
        t,
        cfg,
        data.fit,
        evals,
        chunk=config.checkpoint_every,
        log=log,
        name=f"gate seed={seed} ema_decay={decay}",
        dual_on=data.dual,
        lam_set=lam_set,
        points=points,
      )
      per_seed[decay].append(
        {
          **{f"{s}_worst_late": common.late(curve, s)[0] for s in evals},
          "test_worst_late_sd": common.late(curve, "test")[1],
          "validation_worst_late_sd": common.late(curve, "validation")[1],
          **{f"{s}_worst_final": float(max(curve[-1][s])) for s in evals},
        }
      )
      out["runs"].append(
        {
          "seed": seed,
          "ema_decay": decay,
          **per_seed[decay][-1],
          "steps": [c["step"] for c in curve],
          **{f"{s}_curve": common.worst_curve(curve, s) for s in evals},
        }
      )
  for decay in decays:
    out["summary"][f"decay {decay}"] = common.across_seeds(per_seed[decay])
  late = {d: out["summary"][f"decay {d}"]["validation_worst_late"]["mean"] for d in decays}
  out["decay_chosen_on_validation"] = min(decays, key=lambda d: late[d])
  out["chosen_on"] = CHOSEN_ON
  cols = (
    "test_worst_late",
    "test_worst_late_sd",
    "test_worst_final",
    "validation_worst_late",
    "validation_worst_final",
  )
  rows = [(name, [reporting.pm(s[k]) for k in cols]) for name, s in out["summary"].items()]
  log(
    f"ema (worst case, bits/token, mean ± sd over {len(out['seeds'])} seeds; late: over "
    "the second half of training; late sd: along a run):\n"
    + reporting.table(rows, ["test late", "test late sd", "test final", "val late", "val final"])
    + f"\nlowest validation late worst case: decay {out['decay_chosen_on_validation']}"
  )
  fig, ax = reporting.plt().subplots(figsize=(7, 4.5))
  for i, decay in enumerate(decays):
    for r in (r for r in out["runs"] if r["ema_decay"] == decay):
      first = r["seed"] == config.seed
      ax.plot(
        r["steps"][1:],
        r["test_curve"][1:],
        ".-" if first else "-",
        color=f"C{i}",
        alpha=1 if first else 0.3,
        label=f"ema_decay={decay}" if first else None,
      )
      if first:
        ax.plot(r["steps"][1:], r["validation_curve"][1:], ":", color=f"C{i}")
  ax.set(
    xlabel="gate step",
    ylabel="worst-case L_k (bits/token)",
    title="the reported gate: last iterate vs EMA of w\n"
    "test (faint: other seeds); dotted: validation",
  )
  ax.title.set_fontsize(10)
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "ema", out, fig)
