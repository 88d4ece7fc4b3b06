"""Robust gates of increasing width on increasing data: the held-out worst
case against the training one (does a wider gate overfit its training words?)."""

import numpy as np

from robust_gate import experts, phases
from robust_gate.experiments import common, reporting

SEEDS_NOTE = (
  f"{common.SEEDS_NOTE}; the data subsets are drawn once, from config.seed, and shared by "
  "every seed"
)


def run(config, workdir: str, log=print, hiddens=(4, 32, 256), fractions=(0.1, 0.3, 1.0)) -> dict:
  """A gate of each width in `hiddens` on each fraction of validation's fit part (per
  domain, at least one batch), for every seed; evaluated on that subset and on test."""
  _, m = common.load(config, workdir)
  data, te = common.gate_data(m.caches), m.caches.test
  fit = data.fit
  t = common.gate_training(config)
  rng = np.random.default_rng(config.seed)
  out: dict = {
    **common.seeded(config, SEEDS_NOTE),
    "hiddens": list(hiddens),
    "fractions": list(fractions),
    "runs": [],
  }
  for frac in fractions:
    keep = np.concatenate(
      [
        rng.permutation(np.flatnonzero(fit.data.domain_N == k))[
          : max(t.per_domain, int(frac * np.sum(fit.data.domain_N == k)))
        ]
        for k in range(fit.data.num_domains)
      ]
    )
    sub = fit.subset(keep)
    for h in hiddens:
      cfg = phases.gate_config(config, fit.cache_NxTxM.shape[-1], fit.data.vocab_size, hidden=h)
      per_seed, curves = [], []
      for seed in out["seeds"]:
        state, curve = common.fit_gate(
          common.gate_training(config, seed),
          cfg,
          sub,
          {"train": sub, "test": te},
          chunk=config.checkpoint_every,
          log=log,
          name=f"gate h={h} data={frac} seed={seed}",
          dual_on=data.dual,
        )
        train, test = common.late(curve, "train")[0], common.late(curve, "test")[0]
        per_seed.append(
          {
            "train_worst": train,
            "test_worst": test,
            "test_minus_train": test - train,
            "test_worst_final": float(max(curve[-1]["test"])),
          }
        )
        curves.append(curve)
      out["runs"].append(
        {
          "hidden": h,
          "fraction": frac,
          "examples": len(keep),
          "params": experts.num_params(state.params),
          **common.across_seeds(per_seed),
          "curves": curves,
        }
      )
  cols = ("train_worst", "test_worst", "test_minus_train")
  rows = [
    (
      f"h={r['hidden']} data={r['fraction']}",
      [r["params"], r["examples"], *(r[k]["mean"] for k in cols), r["test_worst"]["sd"]],
    )
    for r in out["runs"]
  ]
  log(
    f"gate_size (worst case, bits/token, mean over the second half of training; mean over "
    f"{len(out['seeds'])} seeds):\n"
    + reporting.table(
      rows, ["params", "examples", "train worst", "test worst", "test − train", "test sd"]
    )
  )
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  for frac in fractions:
    rs = [r for r in out["runs"] if r["fraction"] == frac]
    color = None
    for key, style, label in (("test_worst", "o-", "held-out"), ("train_worst", "x--", "train")):
      bars = ax.errorbar(
        [r["params"] for r in rs],
        [r[key]["mean"] for r in rs],
        yerr=[r[key]["sd"] for r in rs],
        fmt=style,
        color=color,
        capsize=3,
        label=f"{label}, {rs[0]['examples']} seqs",
      )
      color = bars[0].get_color()  # train in its held-out curve's color
  ax.set(
    xscale="log",
    xlabel="gate parameters",
    ylabel="worst-case L_k (bits/token)",
    title=f"gate size vs data (mean ± sd over {len(out['seeds'])} seeds)",
  )
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "gate_size", out, fig)
