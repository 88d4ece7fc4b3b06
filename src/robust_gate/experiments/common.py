"""What several experiments share: the finished main job, the seeds every training is
repeated over and the mean ± sd across them, the split that chooses, gate fits evaluated
along the way, and the worst case of a gate stopped late in training."""

import dataclasses
import json
import os
from typing import Any

import numpy as np

from robust_gate import evaluate, models, phases, pipeline
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.records import Caches, Scored, TrainedModels

# Training seeds per experiment where the config has no `experiment_seeds`.
DEFAULT_SEEDS = 3
# What the seeds of an experiment that refits gates vary, as its JSON states it.
SEEDS_NOTE = (
  "seeds vary the gate's initialization and minibatches; the experts are one training run"
)


def results(workdir: str) -> dict:
  """The finished main job's results.json (a clear error when there is none)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise InputError(
      f"{workdir} has no results.json: run launch/main.py "
      f"--workdir={workdir} with this config first."
    )
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(
      f"{path} cannot be read ({type(e).__name__}: {e}); run launch/evaluate.py "
      f"--workdir={workdir} with this config to write it again."
    ) from e
  if not isinstance(out, dict):
    raise InputError(f"{path} is not a results object; run launch/evaluate.py to write it again.")
  return out


def load(config, workdir: str) -> tuple[dict, TrainedModels]:
  """The finished main job: its results.json and its models, restored quietly (the
  experiments print their own lines)."""
  return results(workdir), pipeline.load_models(config, workdir, log=lambda s: None)


def seeds(config) -> list[int]:
  """The game seeds every training of an experiment is repeated over: config.seed,
  config.seed + 1, ..., `config.experiment_seeds` of them (DEFAULT_SEEDS without it).
  Seed config.seed is the main job's own."""
  n = config.get("experiment_seeds", DEFAULT_SEEDS)
  if isinstance(n, bool) or not isinstance(n, int) or n < 2:
    raise InputError(f"config.experiment_seeds must be an integer ≥ 2 (for an sd), got {n!r}.")
  return [config.seed + i for i in range(n)]


def seeded(config, note: str = SEEDS_NOTE) -> dict[str, Any]:
  """The JSON fields saying which seeds an experiment ran and what they vary."""
  return {"seeds": seeds(config), "seeds_note": note}


def spread(per_seed) -> dict[str, Any]:
  """Numbers (or equal-shaped arrays) over seeds as {"mean", "sd", "per_seed"}: the sd is
  the sample standard deviation (ddof 1), elementwise for arrays."""
  v = np.asarray(per_seed, np.float64)
  return {"mean": v.mean(0).tolist(), "sd": v.std(0, ddof=1).tolist(), "per_seed": v.tolist()}


def across_seeds(per_seed: list[dict]) -> dict[str, Any]:
  """Records of numbers with the same keys, one per seed, as one record with a `spread`
  at every leaf (nested records recursively)."""
  out = {}
  for k, v in per_seed[0].items():
    values = [r[k] for r in per_seed]
    out[k] = across_seeds(values) if isinstance(v, dict) else spread(values)
  return out


@dataclasses.dataclass(frozen=True)
class GateData:
  """The main job's validation split as its gates use it (docs/math.md §4).

  `fit` is what every gate is fitted to; `dual` what the robust gate's dual player
  sees (validation's `gate.dual_holdout` part; None: the dual sees its own training
  losses); `selection` where an experiment measures what it chooses by: the held-out part
  where there is one, else `fit`. Test is reported, never used to choose.
  """

  fit: Scored
  dual: Scored | None

  @property
  def selection(self) -> Scored:
    return self.fit if self.dual is None else self.dual

  @property
  def selection_is(self) -> str:
    """What `selection` is, as the JSON states it."""
    if self.dual is None:
      return "validation: what the gates are fitted to (config.gate.dual_holdout is 0)"
    return "validation's dual-holdout part: no gate is fitted to it; the robust gate's dual sees it"

  def restrict(self, fn) -> "GateData":
    """`fn` applied to every part (a subset of domains or experts)."""
    return GateData(fn(self.fit), None if self.dual is None else fn(self.dual))


def gate_data(caches: Caches) -> GateData:
  """How the gates of the main job with `caches` use its validation split."""
  return GateData(caches.fit, caches.holdout)


def gate_training(config, seed: int | None = None) -> phases.Training:
  """The main job's robust gate's training (config.gate), with game seed `seed`
  (default: config.seed, the main job's)."""
  t = phases.gate_training(config, config.gate.dual_lr)
  return t if seed is None else dataclasses.replace(t, seed=seed)


def gate_losses(cfg: models.GateConfig, params, on: Scored) -> np.ndarray:
  """The gated model's per-domain L_k on a scored split, bits per token."""
  logp, _ = evaluate.gate_logprobs_and_usage(cfg, params, on.data, on.cache_NxTxM)
  return evaluate.excess_bits(evaluate.domain_ce(logp, on.data), on.baseline_K)


def trajectory(step, state, steps: int, points: int, *, chunk: int, name: str):
  """The game's state at step 0 and at `points` evenly spaced steps up to `steps`.

  Each state yielded is donated to the next chunk of training (primal_dual.run): read
  what is needed from it before asking for the next.
  """
  yield state
  for s in np.linspace(0, steps, points + 1).astype(int)[1:]:
    state, _ = train_lib.fit(step, state, int(s), name=name, log=lambda line: None, chunk=chunk)
    yield state


def fit_gate(
  t: phases.Training,
  cfg: models.GateConfig,
  train: Scored,
  evals: dict[str, Scored],
  *,
  chunk: int,
  log,
  name: str,
  dual_on: Scored | None = None,
  lam_set=None,
  params=None,
  points: int = 10,
):
  """A robust gate `cfg` over `train`'s cached experts, trained as `t` says.

  Λ is `lam_set` (default: the simplex); the dual player sees minibatches of `dual_on`
  (`GateData.dual`; None: the gate's training losses). The gate evaluated is the EMA
  of w (`t.ema_decay`; 0: the last iterate, which oscillates: BUILD_NOTES.md), at
  `points` evenly spaced steps (and at step 0) on every split of `evals`; `late`
  summarizes the second half. Training runs in lax.scan chunks of `chunk` steps.

  Returns (state, curve): curve[i] = {"step": s, name: L_k (bits/token) for each eval}.
  """
  lam_set = lam_set or uncertainty_lib.simplex(train.data.num_domains)
  step, start, _ = phases.gate_game(cfg, train, t, lam_set, params, dual_on=dual_on)
  curve = []
  for state in trajectory(step, start, t.steps, points, chunk=chunk, name=name):
    losses = {n: gate_losses(cfg, state.ema_params, e).tolist() for n, e in evals.items()}
    curve.append({"step": int(state.step), **losses})
  log(
    f"{name}: {t.steps} steps; "
    + ", ".join(
      f"{n} worst final {max(curve[-1][n]):.4f}, late {late(curve, n)[0]:.4f}" for n in evals
    )
  )
  return state, curve


def late(curve, name: str, worst=max) -> tuple[float, float]:
  """(mean, std) of worst(L) over the evaluations in the second half of training:
  the held-out worst case of the gate stopped at a random late step."""
  last = curve[-1]["step"]
  vals = [float(worst(np.asarray(c[name]))) for c in curve if c["step"] > last / 2]
  return float(np.mean(vals)), float(np.std(vals))


def worst_curve(curve, name: str) -> list[float]:
  """max_k L_k at every evaluation of a `fit_gate` curve on split `name`."""
  return [float(max(c[name])) for c in curve]
