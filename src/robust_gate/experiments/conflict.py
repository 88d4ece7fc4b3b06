"""Per-domain gradient cosine matrices over training, monolithic model vs gate.

Both are trained again from a fresh initialization for every seed of
`common.seeds` (the main job's losses, learning rates and step counts; the gate as the
main job's robust gate, its dual on validation's holdout part) and the cosines of the
per-domain gradients ∇L_k measured at `points` steps along the way, on one fixed batch.
"""

from typing import Any

import jax
import numpy as np

from robust_gate import evaluate, models, phases
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting

SEEDS_NOTE = (
  "seeds vary both models' initialization and minibatches (both are trained from scratch "
  "here); the gate's experts are one training run; the cosines are measured on one fixed "
  "batch"
)


def mean_off_diagonal(c_KxK: np.ndarray) -> float:
  K = c_KxK.shape[0]
  return float((c_KxK.sum() - np.trace(c_KxK)) / (K * (K - 1)))


def run(config, workdir: str, log=print, points: int = 6) -> dict:
  _, m = common.load(config, workdir)
  tr = m.splits.train
  K = tr.num_domains
  key = jax.random.PRNGKey(config.seed + 17)  # the measurement batch, the same for every seed
  mono = m.monoliths.monolithic
  data = common.gate_data(m.caches)
  lam_set = uncertainty_lib.from_config(config, K)

  def game(name, seed):
    """(loss_fn, step, state, steps) of model `name` trained from scratch with `seed`."""
    if name == "gate":
      t = common.gate_training(config, seed)
      step, state, loss_fn = phases.gate_game(
        m.gates.robust_gate.cfg, data.fit, t, lam_set, dual_on=data.dual
      )
      return loss_fn, step, state, t.steps
    params = models.init_lm(mono.lm_cfg, jax.random.PRNGKey(seed))
    step, state = train_lib.make_game(
      mono.loss_fn, params, num_domains=K, lr=config.monolithic.lr, dual_lr=0.0, seed=seed
    )
    return mono.loss_fn, step, state, config.monolithic.steps

  out: dict[str, Any] = {**common.seeded(config, SEEDS_NOTE), "domains": list(tr.domains)}
  out["models"] = {}
  for name in ("monolithic", "gate"):
    mats = []  # [seeds][points] of K × K cosines
    for seed in out["seeds"]:
      loss_fn, step, state, steps = game(name, seed)
      mats.append(
        [
          evaluate.gradient_conflict(loss_fn, s.params, key)
          for s in common.trajectory(
            step, state, steps, points - 1, chunk=config.checkpoint_every, name=name
          )
        ]
      )
    mats_SxPxKxK = np.asarray(mats)
    off = ~np.eye(K, dtype=bool)
    mean = [[mean_off_diagonal(c) for c in seed_mats] for seed_mats in mats_SxPxKxK]
    neg = np.mean(mats_SxPxKxK[..., off] < 0, axis=-1)
    out["models"][name] = {
      "steps": np.linspace(0, steps, points).astype(int).tolist(),
      "final_mean_off_diagonal": common.spread([r[-1] for r in mean]),
      "final_negative_fraction": common.spread(neg[:, -1]),
      "mean_off_diagonal": common.spread(mean),
      "negative_fraction": common.spread(neg),
      "matrices_mean_over_seeds": mats_SxPxKxK.mean(0).tolist(),
    }
    r = out["models"][name]
    cos = r["mean_off_diagonal"]
    log(
      f"conflict {name} ({len(out['seeds'])} seeds): mean off-diagonal cosine over steps "
      + " ".join(f"{s}:{v:+.3f}±{sd:.3f}" for s, v, sd in zip(r["steps"], cos["mean"], cos["sd"]))
      + f"; negative pairs at the end {r['final_negative_fraction']['mean']:.0%}"
    )
  fig, axes = reporting.plt().subplots(1, 3, figsize=(13, 3.6))
  for name, r in out["models"].items():
    x = np.asarray(r["steps"]) / max(r["steps"][-1], 1)
    avg, sd = (np.asarray(r["mean_off_diagonal"][k]) for k in ("mean", "sd"))
    axes[0].plot(x, avg, marker="o", label=name)
    axes[0].fill_between(x, avg - sd, avg + sd, alpha=0.2)
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set(
    xlabel="fraction of training",
    ylabel="mean cos(∇L_j, ∇L_k), j≠k",
    title=f"gradient conflict over training\n(mean ± sd over {len(out['seeds'])} seeds)",
  )
  axes[0].legend()
  for ax, (name, r) in zip(axes[1:], out["models"].items()):
    im = ax.imshow(np.asarray(r["matrices_mean_over_seeds"][-1]), vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(K), tr.domains, rotation=45)
    ax.set_yticks(range(K), tr.domains)
    ax.set(title=f"{name}: cosines at the end (seed mean)")
  fig.colorbar(im, ax=axes[-1], fraction=0.046)
  return reporting.write(config, workdir, "conflict", out, fig)
