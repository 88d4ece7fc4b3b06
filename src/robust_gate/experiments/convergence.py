"""The robust gate's game played three ways, and the duality gap of docs/math.md §7
along each (§9: what the step-size schedule and the optimistic step are for).

  constant     the dual step η = config.gate.dual_lr throughout
  decreasing   η_t = η/√(1 + t/τ) (dual.inverse_sqrt_schedule, §9.1)
  optimistic   optimistic mirror ascent and optax.optimistic_adam_v2, η constant (§9.2)

Each game runs as the main job's robust gate does (fitted to validation's fit part,
its dual on the holdout part, Λ of the config), once per seed of `common.seeds`. At
step 0 and at `points` evenly spaced steps the reported gate ĝ_t (the EMA of w) has
the upper value U_t = max_{λ∈Λ} Σ_k λ_k L_k(ĝ_t) and, at the average λ̄_t, the lower value

    ℓ_t = min_{c ∈ C} Σ_k λ̄_t,k L_k(c)

over the run's candidate gates C: every snapshot of the run (its EMA and its last
iterate; ĝ_t is one, so ℓ_t ≤ U_t) and a best response to the final λ̄ (λ fixed at
λ̄_T, warm-started from ĝ_T, a few Adam steps). Every candidate belongs to the gate
family, so ℓ_t ≥ min_w Σ_k λ̄_t,k L_k(w): ℓ_t is an estimate of the lower value from
above, and U_t − ℓ_t an estimate of the gap that can only understate the optimization
part of it (§7.1); both are measured on finite held-out data. They are measured on
validation (`common.GateData.selection`), which is where a variant would be chosen, and
reported on test, which is never used to choose. The minimizing candidate is chosen on
validation and that one gate is scored on test (`certificates`): a minimum taken over
test's own losses would select on test and bias its lower value low.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from robust_gate import certificate, models, phases
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting
from robust_gate.records import Scored

VARIANTS = ("constant", "decreasing", "optimistic")
VALUES = ("upper", "lower", "gap")  # of the certificate, in bits per token
LOWER_NOTE = (
  "lower: Σ_k λ̄_t,k L_k of the run's gate (among every snapshot's EMA and last iterate, and "
  "a best response to the final λ̄) with the smallest value on validation, scored on each "
  "split (at most ĝ_t's there, as in docs/math.md §7); an estimate of min_w from above: any "
  "gate of the family gives one (§7.1)"
)
SELECTION = "validation"  # the split of `on` that picks each lower value's gate
CHOSEN_ON = (
  "the smallest mean over seeds of the final value on validation, never on test; "
  "reported, not applied to the config"
)


def variant(t: phases.Training, name: str, timescale: float) -> phases.Training:
  """`t` as variant `name` of VARIANTS plays it."""
  return dataclasses.replace(
    t, dual_timescale=timescale if name == "decreasing" else 0.0, optimistic=name == "optimistic"
  )


def certified_run(
  cfg: models.GateConfig,
  data: common.GateData,
  t: phases.Training,
  lam_set: uncertainty_lib.UncertaintySet,
  on: dict[str, Scored],
  *,
  points: int,
  best_response_steps: int,
  chunk: int,
  name: str,
) -> dict[str, Any]:
  """One game's certificate at step 0 and `points` evenly spaced steps, on each split
  of `on`: {"steps": [...], "lambda_bar": λ̄_T, "lower_gate": [the name of each lower
  value's gate], split: {value: [...] for VALUES}}."""
  losses = lambda params: {n: common.gate_losses(cfg, params, s) for n, s in on.items()}
  step, start, _ = phases.gate_game(cfg, data.fit, t, lam_set, dual_on=data.dual)
  steps, reported, lam_bars, candidates, names = [], [], [], [], []
  for state in common.trajectory(step, start, t.steps, points, chunk=chunk, name=name):
    steps.append(int(state.step))
    reported.append(losses(state.ema_params))
    candidates += [reported[-1], losses(state.params)]
    names += [f"EMA at step {steps[-1]}", f"last iterate at step {steps[-1]}"]
    lam_K = np.asarray(state.lam_avg_K, np.float64)
    lam_bars.append(lam_K / lam_K.sum())
  # The best response to λ̄_T: λ fixed there (dual step 0), plain Adam from ĝ_T.
  br = dataclasses.replace(
    t, steps=best_response_steps, dual_lr=0.0, dual_timescale=0.0, optimistic=False
  )
  lam_T = jnp.asarray(lam_bars[-1], jnp.float32)
  br_step, br_state, _ = phases.gate_game(cfg, data.fit, br, None, state.ema_params, lam_K=lam_T)
  br_state, _ = train_lib.fit(
    br_step, br_state, br.steps, name=f"{name} best response", log=lambda line: None, chunk=chunk
  )
  candidates += [losses(br_state.ema_params), losses(br_state.params)]
  names += ["best response EMA", "best response last iterate"]
  certs = certificates(reported, candidates, lam_bars, lam_set)
  lower_gate = [names[c] for c in certs.pop("lower_candidate")]
  return {"steps": steps, "lambda_bar": lam_bars[-1].tolist(), "lower_gate": lower_gate, **certs}


def certificates(
  reported: list[dict[str, np.ndarray]],
  candidates: list[dict[str, np.ndarray]],
  lam_bars: list[np.ndarray],
  lam_set: uncertainty_lib.UncertaintySet,
) -> dict[str, Any]:
  """The certificate of each reported gate on every split, {split: {value: [...]}} for
  VALUES, and under "lower_candidate" the index into `candidates` of each lower value's
  gate.

  reported[t] and candidates[c] hold L_k per split; lam_bars[t] is λ̄_t. The lower
  value's gate at t is the candidate with the smallest Σ_k λ̄_t,k L_k on SELECTION, and
  every split scores that same gate (`certificate.duality_gap`: the smaller of its
  value and ĝ_t's, so lower ≤ upper).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  on_selection_CxK = np.stack([c[SELECTION] for c in candidates])
  chosen = [int(np.argmin(on_selection_CxK @ lam)) for lam in lam_bars]
  out: dict[str, Any] = {"lower_candidate": chosen}
  for n in reported[0]:
    certs = [
      certificate.duality_gap(f32(g[n]), f32(candidates[c][n]), f32(lam), lam_set)
      for g, c, lam in zip(reported, chosen, lam_bars)
    ]
    out[n] = {v: [float(getattr(cert, v)) for cert in certs] for v in VALUES}
  return out


def run(
  config,
  workdir: str,
  log=print,
  points: int = 10,
  timescale: float = 100.0,
  best_response_steps: int | None = None,
) -> dict:
  """Every variant over every seed; the variant with the smallest final gap and worst
  case on validation.

  τ of the decreasing variant is config.gate.dual_timescale where it is > 0, else
  `timescale` (`finite.solve`'s). The best response trains `best_response_steps`
  steps (default: a quarter of config.gate.steps).
  """
  _, m = common.load(config, workdir)
  data, te = common.gate_data(m.caches), m.caches.test
  cfg = m.gates.robust_gate.cfg
  lam_set = uncertainty_lib.from_config(config, te.data.num_domains)
  on = {"validation": data.selection, "test": te}
  tau = float(config.gate.dual_timescale or timescale)
  br_steps = best_response_steps or max(1, config.gate.steps // 4)
  out: dict[str, Any] = {
    **common.seeded(config),
    "units": "bits/token",
    "uncertainty": lam_set.kind,
    "dual_lr": config.gate.dual_lr,
    "decreasing_timescale": tau,
    "best_response_steps": br_steps,
    "validation_is": data.selection_is,
    "lower_is_estimate": True,
    "lower_note": LOWER_NOTE,
    "final": {},
    "lambda_bar_final": {},
    "lower_gate_final": {},
  }
  curves: dict[str, Any] = {}
  for name in VARIANTS:
    runs = [
      certified_run(
        cfg,
        data,
        variant(common.gate_training(config, seed), name, tau),
        lam_set,
        on,
        points=points,
        best_response_steps=br_steps,
        chunk=config.checkpoint_every,
        name=f"gate {name} seed={seed}",
      )
      for seed in out["seeds"]
    ]
    curves["steps"] = runs[0]["steps"]
    curves[name] = {n: {v: common.spread([r[n][v] for r in runs]) for v in VALUES} for n in on}
    out["final"][name] = {
      f"{n}_{'worst_case' if v == 'upper' else v}": common.spread([r[n][v][-1] for r in runs])
      for n in on
      for v in VALUES
    }
    out["lambda_bar_final"][name] = common.spread([r["lambda_bar"] for r in runs])
    out["lower_gate_final"][name] = [r["lower_gate"][-1] for r in runs]  # per seed
  final = out["final"]
  for key in ("validation_gap", "validation_worst_case"):
    out[f"smallest_final_{key}"] = min(VARIANTS, key=lambda n: final[n][key]["mean"])
  out["chosen_on"] = CHOSEN_ON
  out["curves"] = curves
  cols = ("validation_gap", "validation_worst_case", "test_gap", "test_worst_case")
  rows = [(n, [reporting.pm(final[n][k]) for k in cols]) for n in final]
  log(
    f"convergence (final values, bits/token, mean ± sd over {len(out['seeds'])} seeds; "
    "lower values are estimates):\n"
    + reporting.table(rows, ["val gap", "val worst", "test gap", "test worst"])
    + f"\nsmallest final validation gap: {out['smallest_final_validation_gap']}; "
    f"worst case: {out['smallest_final_validation_worst_case']}"
  )
  return reporting.write(config, workdir, "convergence", out, figure(curves, len(out["seeds"])))


def figure(curves: dict[str, Any], num_seeds: int):
  """The gap against steps per variant, validation and test (left), and the upper and
  lower values on validation (right), each a mean with a ±sd band over seeds."""
  fig, axes = reporting.plt().subplots(1, 2, figsize=(12, 4.2))
  x = np.asarray(curves["steps"])
  for i, name in enumerate(VARIANTS):
    for ax, split, value, style in (
      (axes[0], "validation", "gap", "-"),
      (axes[0], "test", "gap", "--"),
      (axes[1], "validation", "upper", "-"),
      (axes[1], "validation", "lower", ":"),
    ):
      mean, sd = (np.asarray(curves[name][split][value][k]) for k in ("mean", "sd"))
      ax.plot(x, mean, style, color=f"C{i}", label=f"{name}, {split} {value}")
      if split == "validation":  # test, never chosen on, as a line only
        ax.fill_between(x, mean - sd, mean + sd, color=f"C{i}", alpha=0.15)
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set(
    xlabel="gate step",
    ylabel="U − ℓ (bits/token)",
    title=f"duality gap (estimate), mean ± sd over {num_seeds} seeds",
  )
  axes[1].set(
    xlabel="gate step",
    ylabel="bits/token",
    title="upper U(ĝ_t) and lower ℓ(λ̄_t) on validation",
  )
  for ax in axes:
    ax.legend(fontsize=7)
  return fig
