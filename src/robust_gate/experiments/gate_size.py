"""Robust gates of increasing width on increasing data: the held-out worst
case against the training one (does a wider gate overfit its training words?)."""

import numpy as np

from robust_gate import experts, phases
from robust_gate.experiments import common, reporting


def run(config, workdir: str, log=print, hiddens=(4, 32, 256), fractions=(0.1, 0.3, 1.0)) -> dict:
  """A gate of each width in `hiddens` on each fraction of the validation split
  (per domain, at least one batch), evaluated on that subset and on test."""
  _, m = common.load(config, workdir)
  va, te = m.caches.validation, m.caches.test
  t = common.gate_training(config)
  rng = np.random.default_rng(config.seed)
  out: dict = {"hiddens": list(hiddens), "fractions": list(fractions), "runs": []}
  for frac in fractions:
    keep = np.concatenate(
      [
        rng.permutation(np.flatnonzero(va.data.domain_N == k))[
          : max(t.per_domain, int(frac * np.sum(va.data.domain_N == k)))
        ]
        for k in range(va.data.num_domains)
      ]
    )
    sub = va.subset(keep)
    for h in hiddens:
      cfg = phases.gate_config(config, va.cache_NxTxM.shape[-1], va.data.vocab_size, hidden=h)
      state, curve = common.fit_gate(
        t,
        cfg,
        sub,
        {"train": sub, "test": te},
        chunk=config.checkpoint_every,
        log=log,
        name=f"gate h={h} data={frac}",
      )
      (train, _), (test, test_sd) = common.late(curve, "train"), common.late(curve, "test")
      out["runs"].append(
        {
          "hidden": h,
          "fraction": frac,
          "examples": len(keep),
          "params": experts.num_params(state.params),
          "train_worst": train,
          "test_worst": test,
          "test_worst_sd": test_sd,
          "test_worst_final": float(max(curve[-1]["test"])),
          "curve": curve,
        }
      )
  cols = ("params", "examples", "train_worst", "test_worst")
  rows = [
    (
      f"h={r['hidden']} data={r['fraction']}",
      [*(r[k] for k in cols), r["test_worst"] - r["train_worst"]],
    )
    for r in out["runs"]
  ]
  log(
    "gate_size (worst case, bits/token, mean over the second half of training):\n"
    + reporting.table(rows, ["params", "examples", "train worst", "test worst", "test − train"])
  )
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  for frac in fractions:
    rs = [r for r in out["runs"] if r["fraction"] == frac]
    params = [r["params"] for r in rs]
    ax.plot(
      params, [r["test_worst"] for r in rs], "o-", label=f"held-out, {rs[0]['examples']} seqs"
    )
    ax.plot(
      params,
      [r["train_worst"] for r in rs],
      "x--",
      color=ax.lines[-1].get_color(),
      label=f"train, {rs[0]['examples']} seqs",
    )
  ax.set(
    xscale="log",
    xlabel="gate parameters",
    ylabel="worst-case L_k (bits/token)",
    title="gate size vs data",
  )
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "gate_size", out, fig)
