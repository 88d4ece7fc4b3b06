"""The main job's student against the single models of its size, over training seeds
(docs/math.md §5): whether the student's worst case is below (or above) theirs beyond
training noise, which one run cannot say (on one H200 the monolithic model's worst case
ranged over 0.1 bits in four runs of one config; BUILD_NOTES.md).

For each seed of `common.seeds`, the three models the comparison is about are trained
exactly as the main job trains them (robust_gate.phases: the same config sections,
steps, data and code), from that seed:

  student         `phases.distill_student`: from the expert of λ̄'s largest entry, its
                  domains weighted as config.distill.weights says; the seed sets its
                  minibatches
  monolithic      `phases.train_monoliths`: the seed sets initialization and minibatches
  monolithic_dro  the same, with group DRO's dual player

At config.seed they are the main job's own models, read from the workdir. The experts,
the robust gate (the teacher), λ̄ and Λ are the main job's in every seed.

On test, per seed, each model's worst case with results.json's intervals
(evaluate.results_on_test, the same key and resamples), and the student's paired
worst-case difference from each same-size model [point, lo, hi] in bits (negative: the
student is better; `student_size.on_test`); over seeds, mean ± sd of each, and in how
many seeds each difference exceeds the test set's noise either way. Nothing is chosen
here: test numbers are outcomes.

  python3 launch/experiment.py --experiment=student_seeds --config=<the job's> --workdir=<it>
"""

import copy
from typing import Any

import numpy as np

from robust_gate import evaluate, phases, students
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting, sequence_gate, student_size
from robust_gate.records import TrainedModels

NAME = "student_seeds"
SAME_SIZE = student_size.SAME_SIZE  # the monolithic and group-DRO models of one expert's size
MODELS = ("student", *SAME_SIZE)
SEEDS_NOTE = (
  "seeds vary the student's minibatches and the same-size models' initialization and "
  "minibatches; at config.seed all three are the main job's own; the experts and the teacher "
  "are the main job's one run"
)


def _three(student, monoliths) -> dict[str, tuple[Any, Any]]:
  """The student and the same-size models as {name: (lm_cfg, params)}."""
  out = {"student": (student.lm_cfg, student.params)}
  for n in SAME_SIZE:
    model = getattr(monoliths, n)
    out[n] = (model.lm_cfg, model.params)
  return out


def _trained(m: TrainedModels) -> dict[str, tuple[Any, Any]]:
  """The main job's three models."""
  return _three(m.student, m.monoliths)


def train_seed(config, m: TrainedModels, seed: int, log=print) -> dict[str, tuple[Any, Any]]:
  """The student and the same-size models trained from `seed` by the main job's own
  phase functions, in memory: {name: (lm_cfg, params)}. (The large monolithic model,
  which `phases.train_monoliths` builds too, is not one of them and is not trained.)"""
  seeded = copy.deepcopy(config)
  seeded.seed = seed

  def run(game: phases.Game):
    if game.name not in MODELS:
      return game.state
    state, _ = train_lib.fit(
      game.step,
      game.state,
      game.steps,
      name=f"{game.name} seed={seed}",
      log=lambda line: None,
      chunk=config.checkpoint_every,
    )
    log(f"{NAME}: {game.name} seed={seed}: {game.steps} steps")
    return state

  student = phases.distill_student(seeded, m.splits, m.caches, m.gates.robust_gate, run)
  return _three(student, phases.train_monoliths(seeded, m.splits, m.caches, run))


def score_seed(config, m: TrainedModels, trained: dict[str, tuple[Any, Any]]) -> tuple[dict, float]:
  """One seed's models on test: ({name: its entry}, the teacher's worst case). An entry
  is `student_size.on_test`'s (worst case, its interval, mean, gap to the teacher), the
  student's with its paired differences from the same-size models."""
  te, gate = m.caches.test, m.gates.robust_gate
  lam_set = uncertainty_lib.from_config(config, te.data.num_domains)
  nll_N = lambda logp_NxT: evaluate.sequence_nll(logp_NxT, te.data)
  nll = {
    n: nll_N(evaluate.gate_logprobs_and_usage(g.cfg, g.params, te.data, te.cache_NxTxM)[0])
    for n, g in ((student_size.TEACHER, gate), (evaluate.BEST_RESPONSE, m.gates.best_response))
  }
  large = m.monoliths.monolithic_large  # scored because on_test reports it; not compared
  nll["monolithic_large"] = nll_N(students.lm_logprobs(large.lm_cfg, large.params, te.data))
  for n, (cfg, params) in trained.items():
    nll[n] = nll_N(students.lm_logprobs(cfg, params, te.data))
  scores = sequence_gate.sequence_scores(m, nll, config.baseline)
  entries, fixed = student_size.on_test(
    scores, gate.state.lam_avg_K, lam_set, config.seed, ["student"]
  )
  scored = {"student": entries["student"], **{n: fixed[n] for n in SAME_SIZE}}
  return scored, fixed[student_size.TEACHER]["worst_case"]


def summarize(per_seed: list[dict]) -> dict[str, Any]:
  """Mean ± sd over seeds of every model's worst case and of the student's differences,
  and per same-size model the seeds where the student is better or worse beyond the test
  set's noise, with what all seeds together say."""
  points = [
    {
      **{n: r[n]["worst_case"] for n in MODELS},
      **{f"student_vs_{o}": r["student"][f"vs_{o}"][0] for o in SAME_SIZE},
    }
    for r in per_seed
  ]
  out: dict[str, Any] = {"worst_case": common.across_seeds(points)}
  n = len(per_seed)
  for o in SAME_SIZE:
    better = sum(r["student"][f"vs_{o}"][2] < 0 for r in per_seed)
    worse = sum(r["student"][f"vs_{o}"][1] > 0 for r in per_seed)
    if better == n:
      reading = f"the student is better in all {n} seeds, beyond the test set's noise in each"
    elif worse == n:
      reading = f"the student is worse in all {n} seeds, beyond the test set's noise in each"
    else:
      reading = f"not settled: better in {better} and worse in {worse} of {n} seeds beyond noise"
    out[f"vs_{o}"] = {"seeds_better": better, "seeds_worse": worse, "reading": reading}
  return out


def run(config, workdir: str, log=print) -> dict:
  """Every seed's three models (the main job's at config.seed), scored on test."""
  _, m = common.load(config, workdir)
  per_seed, teacher = [], 0.0
  for seed in common.seeds(config):
    trained = _trained(m) if seed == config.seed else train_seed(config, m, seed, log)
    scored, teacher = score_seed(config, m, trained)  # the teacher's: the same every seed
    per_seed.append({"seed": seed, **scored})
    log(
      f"{NAME}: seed={seed}: worst case "
      + ", ".join(f"{n} {scored[n]['worst_case']:.4f}" for n in MODELS)
    )
  te = m.caches.test
  dc, mc = config.distill, config.monolithic
  out: dict[str, Any] = {
    **common.seeded(config, SEEDS_NOTE),
    "units": "bits/token",
    "uncertainty": uncertainty_lib.from_config(config, te.data.num_domains).kind,
    "student_init": te.data.domains[m.student.init_from],
    "student_weights": dc.weights,
    "sequences": {
      "student": dc.steps * te.data.num_domains * dc.per_domain,
      "monolithic": mc.steps * te.data.num_domains * mc.per_domain,
    },
    "teacher_test_worst_case": teacher,
    **summarize(per_seed),
    "per_seed": per_seed,
  }
  _log_table(out, log)
  return reporting.write(config, workdir, NAME, out, figure(out))


def _log_table(out: dict[str, Any], log) -> None:
  rows = [(n, [reporting.pm(out["worst_case"][n])]) for n in MODELS]
  rows += [
    (f"student − {o}", [reporting.pm(out["worst_case"][f"student_vs_{o}"])]) for o in SAME_SIZE
  ]
  log(
    f"{NAME}: test worst case, bits/token, mean ± sd over {len(out['seeds'])} seeds "
    f"(teacher {out['teacher_test_worst_case']:.4f}):\n"
    + reporting.table(rows, ["worst case"])
    + "\n"
    + "\n".join(f"student vs {o}: {out[f'vs_{o}']['reading']}" for o in SAME_SIZE)
  )


def figure(out: dict[str, Any]):
  """Each seed's test worst case of the three models (dots), their mean (bars), the teacher's."""
  fig, ax = reporting.plt().subplots(figsize=(6, 4))
  x = np.arange(len(MODELS))
  ax.bar(x, [out["worst_case"][n]["mean"] for n in MODELS], 0.6, alpha=0.4)
  for i, n in enumerate(MODELS):
    values = out["worst_case"][n]["per_seed"]
    ax.plot(np.full(len(values), i), values, "o", color="k", ms=4)
  ax.axhline(out["teacher_test_worst_case"], color="C3", lw=1, label="teacher (robust gate)")
  ax.set_xticks(x, MODELS)
  ax.set(
    ylabel="test worst-case L_k (bits/token)",
    title=f"one expert's size, {len(out['seeds'])} seeds",
  )
  ax.legend(fontsize=8)
  return fig
