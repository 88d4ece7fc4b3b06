"""Box and KL-ball Λ against the simplex: the worst case inside and outside Λ."""

import jax.numpy as jnp
import numpy as np

from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting


def run(config, workdir: str, log=print, box_scale=(0.6, 1.5), kl_radius=0.02) -> dict:
  """A gate trained for each Λ and seed, its test worst case measured over every Λ.

  The sets are narrower than the config's defaults (which barely constrain K = 6
  domains): the box [0.6/K, 1.5/K] per domain, the KL ball of radius 0.02 around
  the uniform mixture. (They are arguments, not config fields, because the config's
  Λ is part of the finished robust gate's spec.)
  """
  _, m = common.load(config, workdir)
  data = common.gate_data(m.caches)
  K = data.fit.data.num_domains
  lo, hi = box_scale[0] / K, box_scale[1] / K
  sets = {
    "simplex": uncertainty_lib.simplex(K),
    "box": uncertainty_lib.box(np.full(K, lo), np.full(K, hi)),
    "kl_ball": uncertainty_lib.kl_ball(np.full(K, 1.0 / K), kl_radius),
  }
  worst_in = lambda S: lambda L: S.max_linear(jnp.asarray(L, jnp.float32))[0]
  cfg = m.gates.robust_gate.cfg
  out: dict = {
    **common.seeded(config),
    "box": [lo, hi],
    "kl_radius": kl_radius,
    "trained_on": {},
  }
  for name, lam_set in sets.items():
    per_seed = []
    for seed in out["seeds"]:
      _, curve = common.fit_gate(
        common.gate_training(config, seed),
        cfg,
        data.fit,
        {"test": m.caches.test},
        chunk=config.checkpoint_every,
        log=log,
        name=f"gate Λ={name} seed={seed}",
        dual_on=data.dual,
        lam_set=lam_set,
      )
      per_seed.append(
        {
          "domain_loss_final": curve[-1]["test"],
          **{f"worst_in_{s}": common.late(curve, "test", worst_in(sets[s]))[0] for s in sets},
        }
      )
    out["trained_on"][name] = common.across_seeds(per_seed)
  rows = [
    (f"Λ = {n}", [reporting.pm(r[f"worst_in_{s}"]) for s in sets])
    for n, r in out["trained_on"].items()
  ]
  log(
    "prior (rows: Λ the gate was trained for; columns: worst case over; bits/token, "
    f"mean over the second half of training, mean ± sd over {len(out['seeds'])} seeds):\n"
    + reporting.table(rows, [f"worst in {s}" for s in sets])
  )
  fig, ax = reporting.plt().subplots(figsize=(6, 3.5))
  w = 0.25
  for i, (n, r) in enumerate(out["trained_on"].items()):
    ax.bar(
      np.arange(len(sets)) + i * w,
      [r[f"worst_in_{s}"]["mean"] for s in sets],
      w,
      yerr=[r[f"worst_in_{s}"]["sd"] for s in sets],
      capsize=3,
      label=f"trained for Λ={n}",
    )
  ax.set_xticks(np.arange(len(sets)) + w, [f"worst over {s}" for s in sets])
  ax.set(ylabel="bits/token", title=f"prior knowledge: Λ (± sd over {len(out['seeds'])} seeds)")
  ax.legend(fontsize=7)
  return reporting.write(config, workdir, "prior", out, fig)
