"""The main job as phases that read what the previous ones wrote in the workdir.

    train_experts   K experts (one per domain, stacked, one compiled program) on train
    train_gate      the expert caches on validation/test; the robust gate (the game
                    of docs/math.md §4) and the ERM gate (λ fixed) on the validation cache
    distill         the robust gated model → one expert-sized student (docs/math.md §5)
    train_baselines the monolithic models: expert-sized, all experts' size, group DRO
    evaluate        every method of docs/math.md §6 on test: results.json, table, plots

`run(config, workdir)` chains them (what `launch/main.py` does); each also has its
own launcher. A training phase keeps its checkpoints, metrics.jsonl and spec.json
in `workdir/<model>/` (robust_gate.checkpoints): started again with the same
command it resumes, and it refuses a workdir whose saved spec (config sections and
digests of its inputs) differs from the current one, so runs never mix.

Every model goes through `phases.run_or_restore`: a phase trains the models it owns
and restores, by the same path, the ones it reads; `load_models` restores them all
into a `TrainedModels` record (robust_gate.records).
"""

import functools
import json
import os
import time
from collections.abc import Collection

import jax
import numpy as np

from robust_gate import checkpoints, datasets, evaluate, files, models, parallel, phases, provenance
from robust_gate import data as data_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.experts import num_params
from robust_gate.records import (
  Caches,
  Experts,
  Gates,
  Monoliths,
  Splits,
  Student,
  TrainedModels,
)

__all__ = [
  "TrainedModels",
  "check_config",
  "distill_student",
  "evaluate_all",
  "load_models",
  "load_splits",
  "run",
  "saved_config",
  "train_baselines",
  "train_experts",
  "train_gate",
]

_FLOAT_KEYS = ("lr", "dual_lr", "dro_dual_lr", "ema_decay")


def check_config(config) -> None:
  """Positive sizes and step counts, finite positive learning rates, η ≥ 0, an EMA
  decay in [0, 1), a baseline the data has."""
  phases.check_baseline(config)
  if config.dtype not in models.DTYPES:
    raise InputError(f"config.dtype={config.dtype!r} must be one of {models.DTYPES}.")
  every = config.checkpoint_every
  if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
    raise InputError(f"config.checkpoint_every={every!r} must be a positive int.")
  for section in ("expert", "monolithic", "monolithic_large", "gate", "distill"):
    for key, value in config[section].items():
      name = f"config.{section}.{key}"
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}={value!r} must be a number.")
      if key == "ema_decay":
        ok, want = 0 <= value < 1, "in [0, 1)"
      elif key.endswith("dual_lr") or key == "token_embed":
        ok, want = value >= 0, "finite and ≥ 0"
      else:
        ok, want = value > 0, "finite and > 0"
      if not (np.isfinite(value) and ok):
        raise InputError(f"{name}={value!r} must be {want}.")
      if key not in _FLOAT_KEYS and not isinstance(value, int):
        raise InputError(f"{name}={value!r} must be an int.")


def load_splits(config, data_dir: str) -> Splits:
  options = dict(config.data.options)
  return Splits(
    *(
      data_lib.load_local(config.data.name, split, data_dir, config.data.max_len, **options)
      for split in datasets.SPLITS
    )
  )


_SPLITS_CACHE: dict[tuple[str, str], Splits] = {}


def _splits(config, workdir) -> Splits:
  """The three splits (prepared once under the data dir; memoized per process)."""
  data_dir = config.data_dir or os.path.join(workdir, "tfds")
  key = (json.dumps(config.data.to_dict(), sort_keys=True, default=list), data_dir)
  if key not in _SPLITS_CACHE:
    _SPLITS_CACHE.clear()
    if not parallel.is_main():  # process 0 prepares the TFDS dataset, the others read it
      parallel.sync(f"data {data_dir}")
    _SPLITS_CACHE[key] = load_splits(config, data_dir)
    if parallel.is_main():
      parallel.sync(f"data {data_dir}")
  return _SPLITS_CACHE[key]


class _Workdir:
  """The models of one workdir, each built when first asked for: trained when its
  name is in `train`, restored otherwise (both by `phases.run_or_restore`)."""

  def __init__(self, config, workdir: str, log, train: Collection[str] = ()):
    self.config, self.workdir, self.log, self.train = config, workdir, log, frozenset(train)

  def _run(self, game: phases.Game):
    return phases.run_or_restore(
      game,
      self.workdir,
      train=game.name in self.train,
      chunk=self.config.checkpoint_every,
      log=self.log,
    )

  @functools.cached_property
  def splits(self) -> Splits:
    return _splits(self.config, self.workdir)

  @functools.cached_property
  def experts(self) -> Experts:
    return phases.train_experts(self.config, self.splits, self._run)

  @functools.cached_property
  def caches(self) -> Caches:
    return phases.score(self.config, self.workdir, self.splits, self.experts)

  @functools.cached_property
  def gates(self) -> Gates:
    return phases.train_gates(self.config, self.caches, self._run)

  @functools.cached_property
  def student(self) -> Student:
    return phases.distill_student(
      self.config, self.splits, self.caches, self.gates.robust_gate, self._run
    )

  @functools.cached_property
  def monoliths(self) -> Monoliths:
    return phases.train_monoliths(self.config, self.splits, self.caches, self._run)

  def models(self) -> TrainedModels:
    return TrainedModels(self.splits, self.caches, self.gates, self.student, self.monoliths)


# The models each phase trains (the directories it writes in the workdir).
_TRAINS = {
  "train_experts": ("experts",),
  "train_gate": ("robust_gate", "erm_gate"),
  "distill": ("student",),
  "train_baselines": ("monolithic", "monolithic_dro", "monolithic_large"),
  "evaluate": (),
}


def _start(config, workdir, log, phase) -> _Workdir:
  """Checks the config and the workdir, records the config, and says what runs where."""
  check_config(config)
  try:
    if parallel.is_main():
      os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot use --workdir={workdir!r}: {e.strerror}.") from e
  files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  w = _Workdir(config, workdir, log, train=_TRAINS[phase])
  s = w.splits
  uncertainty_lib.from_config(config, s.train.num_domains)  # Λ checked before any work
  if config.gate.dual_lr == 0 and phase == "train_gate":
    log(
      "note: config.gate.dual_lr=0, so the robust gate is trained as the ERM gate "
      "(λ fixed at Λ's prior)."
    )
  log(
    f"{phase}: {jax.device_count()} {jax.devices()[0].platform} device(s) in "
    f"{jax.process_count()} process(es), data "
    f"{config.data.name}, domains {list(s.train.domains)}, train "
    f"{s.train.counts().tolist()}, validation {s.validation.counts().tolist()}, "
    f"test {s.test.counts().tolist()}"
  )
  return w


def train_experts(config, workdir: str, log=print) -> Experts:
  """Phase 1: the K experts, expert k on domain k (resumes from checkpoints)."""
  return _start(config, workdir, log, "train_experts").experts


def train_gate(config, workdir: str, log=print) -> Gates:
  """Phase 2: caches, then the robust and the ERM gate."""
  return _start(config, workdir, log, "train_gate").gates


def distill_student(config, workdir: str, log=print) -> Student:
  """Phase 3: the student, distilled from the robust gated model with weights λ̄."""
  return _start(config, workdir, log, "distill").student


def train_baselines(config, workdir: str, log=print) -> Monoliths:
  """Phase 4: the monolithic baselines."""
  return _start(config, workdir, log, "train_baselines").monoliths


def load_models(config, workdir: str, log=print) -> TrainedModels:
  """Everything the phases trained in `workdir`, restored (for evaluation, notebooks).

  Raises InputError naming the first model the workdir does not hold finished.
  """
  return _Workdir(config, workdir, log).models()


def saved_config(workdir: str):
  """The config the phases last ran with in `workdir` (workdir/config.json)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{workdir} has no config.json: no phase has run there.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_all(config, workdir: str, log=print) -> dict:
  """Phase 5: every method on test → results.json, the table and the plots."""
  m = _start(config, workdir, log, "evaluate").models()
  domains, K = m.splits.test.domains, m.splits.test.num_domains
  lam_set = uncertainty_lib.from_config(config, K)
  robust, mono = m.gates.robust_gate, m.monoliths.monolithic
  methods, use = evaluate.methods_on_test(m, lam_set)
  conflict_key = jax.random.PRNGKey(config.seed + 17)
  results = {
    "units": "bits/token",
    "baseline": config.baseline,
    "uncertainty": lam_set.kind,
    "dataset": config.data.name,
    "domains": list(domains),
    "experts": list(domains),
    "lambda_bar": dict(zip(domains, map(float, robust.state.lam_avg_K))),
    "lambda_last": dict(zip(domains, map(float, robust.state.lam_K))),
    "methods": methods,
    "gate_usage": {k: v.tolist() for k, v in use.items()},
    "gradient_conflict": {
      "monolithic": evaluate.gradient_conflict(mono.loss_fn, mono.params, conflict_key).tolist(),
      "gate": evaluate.gradient_conflict(robust.loss_fn, robust.params, conflict_key).tolist(),
    },
    "student_init": domains[m.student.init_from],
    "num_params": {
      "expert": num_params(m.experts.params) // K,
      "student": num_params(m.student.params),
      "gate": num_params(robust.params),
      "monolithic": num_params(mono.params),
      "monolithic_large": num_params(m.monoliths.monolithic_large.params),
    },
    "provenance": provenance.collect(config).to_dict(),
  }
  files.write_json(os.path.join(workdir, "results.json"), results)
  lam_history = {
    name: checkpoints.stack_metrics(
      checkpoints.read_metrics(os.path.join(workdir, name), up_to=steps)
    )["lam"]
    for name, steps in (
      ("robust_gate", config.gate.steps),
      ("monolithic_dro", config.monolithic.steps),
    )
  }
  if parallel.is_main():
    evaluate.plot(results, lam_history, workdir)
  log(evaluate.format_table(results))
  return results


def run(config, workdir: str, log=print) -> dict:
  """Every phase in order; returns the results dict (also in workdir/results.json)."""
  timings = {}

  def timed(name, phase):
    t0 = time.perf_counter()
    out = phase(config, workdir, log)
    timings[name] = round(time.perf_counter() - t0, 2)
    return out

  timed("train_experts", train_experts)
  timed("train_gate", train_gate)
  timed("distill", distill_student)
  timed("train_baselines", train_baselines)
  results = timed("evaluate", evaluate_all)
  results["seconds"] = timings
  files.write_json(os.path.join(workdir, "results.json"), results)
  return results
