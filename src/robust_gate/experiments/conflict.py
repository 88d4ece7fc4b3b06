"""Per-domain gradient cosine matrices over training, monolithic model vs gate.

Both are trained again from a fresh initialization (the main job's losses, learning
rates and step counts) and the cosines of the per-domain gradients ∇L_k measured at
`points` steps along the way, on one fixed batch.
"""

from typing import Any

import jax
import numpy as np

from robust_gate import evaluate, models
from robust_gate import train as train_lib
from robust_gate.experiments import common, reporting


def mean_off_diagonal(c_KxK: np.ndarray) -> float:
  K = c_KxK.shape[0]
  return float((c_KxK.sum() - np.trace(c_KxK)) / (K * (K - 1)))


def run(config, workdir: str, log=print, points: int = 6) -> dict:
  _, m = common.load(config, workdir)
  tr = m.splits.train
  K = tr.num_domains
  key = jax.random.PRNGKey(config.seed + 17)
  mono, gate = m.monoliths.monolithic, m.gates.robust_gate
  runs = {
    "monolithic": (
      mono.loss_fn,
      models.init_lm(mono.lm_cfg, jax.random.PRNGKey(config.seed)),
      config.monolithic.lr,
      0.0,
      config.monolithic.steps,
    ),
    "gate": (
      gate.loss_fn,
      models.init_gate(gate.cfg, jax.random.PRNGKey(config.seed)),
      config.gate.lr,
      config.gate.dual_lr,
      config.gate.steps,
    ),
  }
  out: dict[str, Any] = {"domains": list(tr.domains), "models": {}}
  for name, (loss_fn, params, lr, dual_lr, steps) in runs.items():
    step, state = train_lib.make_game(
      loss_fn, params, num_domains=K, lr=lr, dual_lr=dual_lr, seed=config.seed
    )
    at = np.unique(np.linspace(0, steps, points).astype(int))
    mats = []
    for s in at:
      if s > int(state.step):
        state, _ = train_lib.fit(
          step, state, int(s), name=name, log=lambda s: None, chunk=config.checkpoint_every
        )
      mats.append(evaluate.gradient_conflict(loss_fn, state.params, key))
    mean = [mean_off_diagonal(c) for c in mats]
    neg = [float(np.mean(c[~np.eye(K, dtype=bool)] < 0)) for c in mats]
    out["models"][name] = {
      "steps": at.tolist(),
      "mean_off_diagonal": mean,
      "negative_fraction": neg,
      "matrices": [c.tolist() for c in mats],
    }
    log(
      f"conflict {name}: mean off-diagonal cosine over steps "
      + " ".join(f"{s}:{v:+.3f}" for s, v in zip(at, mean))
      + f"; negative pairs at the end {neg[-1]:.0%}"
    )
  fig, axes = reporting.plt().subplots(1, 3, figsize=(13, 3.6))
  for name, r in out["models"].items():
    x = np.asarray(r["steps"]) / max(r["steps"][-1], 1)
    axes[0].plot(x, r["mean_off_diagonal"], marker="o", label=name)
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set(
    xlabel="fraction of training",
    ylabel="mean cos(∇L_j, ∇L_k), j≠k",
    title="gradient conflict over training",
  )
  axes[0].legend()
  for ax, (name, r) in zip(axes[1:], out["models"].items()):
    im = ax.imshow(np.asarray(r["matrices"][-1]), vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(K), tr.domains, rotation=45)
    ax.set_yticks(range(K), tr.domains)
    ax.set(title=f"{name}: cosines at the end")
  fig.colorbar(im, ax=axes[-1], fraction=0.046)
  return reporting.write(config, workdir, "conflict", out, fig)
