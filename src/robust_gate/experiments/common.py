"""What several experiments share: the finished main job, gate fits evaluated along
the way, and the worst case of a gate stopped late in training."""

import json
import os

import numpy as np

from robust_gate import evaluate, models, phases, pipeline
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.records import Scored, TrainedModels


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


def gate_training(config) -> phases.Training:
  """The main job's robust gate's training (config.gate)."""
  return phases.gate_training(config, config.gate.dual_lr)


def gate_losses(cfg: models.GateConfig, params, on: Scored) -> np.ndarray:
  """The gated model's per-domain L_k on a scored split, bits per token."""
  logp, _ = evaluate.gate_logprobs_and_usage(cfg, params, on.data, on.cache_NxTxM)
  return evaluate.excess_bits(evaluate.domain_ce(logp, on.data), on.baseline_K)


def fit_gate(
  t: phases.Training,
  cfg: models.GateConfig,
  train: Scored,
  evals: dict[str, Scored],
  *,
  chunk: int,
  log,
  name: str,
  lam_set=None,
  params=None,
  points: int = 10,
):
  """A robust gate `cfg` over `train`'s cached experts, trained as `t` says.

  Λ is `lam_set` (default: the simplex). The gate evaluated is the EMA of w
  (`t.ema_decay`; 0: the last iterate, which oscillates: BUILD_NOTES.md), at `points`
  evenly spaced steps (and at step 0) on every split of `evals`; `late` summarizes
  the second half. Training runs in lax.scan chunks of `chunk` steps.

  Returns (state, curve): curve[i] = {"step": s, name: L_k (bits/token) for each eval}.
  """
  lam_set = lam_set or uncertainty_lib.simplex(train.data.num_domains)
  step, state, _ = phases.gate_game(cfg, train, t, lam_set, params)

  def point(p):
    return {
      "step": int(state.step),
      **{n: gate_losses(cfg, p, e).tolist() for n, e in evals.items()},
    }

  curve = [point(state.ema_params)]
  for s in np.linspace(0, t.steps, points + 1).astype(int)[1:]:
    state, _ = train_lib.fit(step, state, int(s), name=name, log=lambda line: None, chunk=chunk)
    curve.append(point(state.ema_params))
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
