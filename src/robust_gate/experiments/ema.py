"""The gate reported as an EMA of w (docs/math.md §4) against the last iterate."""

import dataclasses

import numpy as np

from robust_gate.experiments import common, reporting


def run(
  config, workdir: str, log=print, decays=(0.0, 0.9, 0.99, 0.998), seeds=(0, 1, 2), points=30
) -> dict:
  """The robust gate refitted at each EMA decay (0: the last iterate) and gate seed.

  The EMA does not feed back into training, so for one seed every decay sees the
  same trajectory of w and λ: the runs differ only in which gate is read off. Each
  is evaluated on validation (its training data) and test at `points` steps; `late`
  gives the mean and spread of the test worst case over the second half (what the
  last iterate's oscillation makes noisy), and the spread of the final worst case
  over gate seeds (config.seed + s; the experts stay those of the main job) is the
  draw a single run reports.
  """
  _, m = common.load(config, workdir)
  va, te = m.caches.validation, m.caches.test
  cfg = m.gates.robust_gate.cfg
  out: dict = {
    "decays": list(decays),
    "seeds": list(seeds),
    "steps": config.gate.steps,
    "runs": [],
    "summary": [],
  }
  for s in seeds:
    seed = config.seed + s
    for decay in decays:
      t = dataclasses.replace(common.gate_training(config), seed=seed, ema_decay=decay)
      _, curve = common.fit_gate(
        t,
        cfg,
        va,
        {"validation": va, "test": te},
        chunk=config.checkpoint_every,
        log=log,
        name=f"gate seed+{s} ema_decay={decay}",
        points=points,
      )
      worst, worst_sd = common.late(curve, "test")
      out["runs"].append(
        {
          "seed": seed,
          "ema_decay": decay,
          "test_worst_late": worst,
          "test_worst_late_sd": worst_sd,
          "test_worst_final": float(max(curve[-1]["test"])),
          "validation_worst_final": float(max(curve[-1]["validation"])),
          "curve": [(c["step"], max(c["test"])) for c in curve],
          "validation_curve": [(c["step"], max(c["validation"])) for c in curve],
        }
      )
  for decay in decays:
    rs = [r for r in out["runs"] if r["ema_decay"] == decay]
    final = [r["test_worst_final"] for r in rs]
    mean = lambda key, rs=rs: float(np.mean([r[key] for r in rs]))
    out["summary"].append(
      {
        "ema_decay": decay,
        "test_worst_late": mean("test_worst_late"),
        "test_worst_late_sd": mean("test_worst_late_sd"),
        "test_worst_final": float(np.mean(final)),
        "test_worst_final_sd_over_seeds": float(np.std(final)),
        "validation_worst_final": mean("validation_worst_final"),
      }
    )
  cols = (
    "test_worst_late",
    "test_worst_late_sd",
    "test_worst_final",
    "test_worst_final_sd_over_seeds",
    "validation_worst_final",
  )
  rows = [(f"decay {r['ema_decay']}", [r[k] for k in cols]) for r in out["summary"]]
  log(
    f"ema (test worst case, bits/token, {len(seeds)} gate seeds; late: over the second "
    "half of training):\n"
    + reporting.table(rows, ["late mean", "late std", "final mean", "final std", "val final"])
  )
  fig, ax = reporting.plt().subplots(figsize=(7, 4.5))
  for i, decay in enumerate(decays):
    for r in (r for r in out["runs"] if r["ema_decay"] == decay):
      xs, ys = zip(*r["curve"][1:])
      first = r["seed"] == config.seed + seeds[0]
      ax.plot(
        xs,
        ys,
        ".-" if first else "-",
        color=f"C{i}",
        alpha=1 if first else 0.3,
        label=f"ema_decay={decay}" if first else None,
      )
      if first:
        xs, ys = zip(*r["validation_curve"][1:])
        ax.plot(xs, ys, ":", color=f"C{i}")
  ax.set(
    xlabel="gate step",
    ylabel="worst-case L_k (bits/token)",
    title="the reported gate: last iterate vs EMA of w\n"
    "test (faint: other seeds); dotted: validation (the gate's training data)",
  )
  ax.title.set_fontsize(10)
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "ema", out, fig)
