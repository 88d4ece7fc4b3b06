"""The main job as phases that read what the previous ones wrote in the workdir.

    train_experts   K experts (one per domain, stacked, one compiled program) on train
    train_gate      the expert caches on validation/test; on validation's fit part, the
                    robust gate (the game of docs/math.md §4, its dual player on the
                    other part), the ERM gate (λ fixed) and the best response to λ̄ (§7.1)
    distill         the robust gated model → one expert-sized student (docs/math.md §5)
    train_baselines the monolithic models: expert-sized, all experts' size, group DRO
    evaluate        every method of docs/math.md §6 on test: results.json, table, plots

`run(config, workdir)` chains them (what `launch/main.py` does); each also has its
own launcher. A training phase keeps its checkpoints, metrics.jsonl and spec.json
in `workdir/<model>/` (robust_gate.checkpoints): started again with the same
command it resumes, and it refuses a workdir whose saved spec (config sections and
digests of its inputs) differs from the current one, so runs never mix. More steps
extend a model, but not in place of what was built from it: a phase that would train
a model past its checkpoints while a model or cache built from it is in the workdir
is refused before any training (`_refuse_extensions`). A phase records the config it
ran with (config.json) once it has finished.

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

from robust_gate import (
  checkpoints,
  datasets,
  evaluate,
  files,
  models,
  parallel,
  phases,
  provenance,
  workdirs,
)
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

_FLOAT_KEYS = ("lr", "dual_lr", "dro_dual_lr", "ema_decay", "dual_holdout", "dual_timescale")


def check_config(config) -> None:
  """Positive sizes and step counts, finite positive learning rates, η ≥ 0, an EMA
  decay and a dual holdout in [0, 1), a dual timescale ≥ 0, optimism 0 or 1, a
  baseline the data has; data options in their domains, sequences that fit the
  context, a data_dir that can be a directory. All before any work: a value that
  reached TFDS or wordfreq would end in their traceback, not one line."""
  data = config.data
  dataset = datasets.make_config(data.name, **dict(data.options))
  if isinstance(data.max_len, bool) or not isinstance(data.max_len, int) or data.max_len < 2:
    raise InputError(f"config.data.max_len={data.max_len!r} must be an int ≥ 2.")
  if dataset.max_tokens() > data.max_len - 1:
    raise InputError(
      f"config.data.max_len={data.max_len} holds {data.max_len - 1} tokens besides BOS/EOS "
      f"but {data.name} examples have up to {dataset.max_tokens()}; set it to "
      f"{dataset.max_tokens() + 1} or more."
    )
  if not isinstance(config.data_dir, str):
    raise InputError(f"config.data_dir={config.data_dir!r} must be a path (or '').")
  existing = config.data_dir  # the path, or the nearest of its parents that exists
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if existing and not os.path.isdir(existing):
    raise InputError(
      f"config.data_dir={config.data_dir!r} cannot be a directory: {existing!r} is a file; "
      f"give a directory (or '' for <workdir>/tfds)."
    )
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
      if key in ("ema_decay", "dual_holdout"):
        ok, want = 0 <= value < 1, "in [0, 1)"
      elif key == "optimistic":
        ok, want = value in (0, 1), "0 or 1"
      elif key.endswith("dual_lr") or key in ("token_embed", "dual_timescale"):
        ok, want = value >= 0, "finite and ≥ 0"
      else:
        ok, want = value > 0, "finite and > 0"
      if not (np.isfinite(value) and ok):
        raise InputError(f"{name}={value!r} must be {want}.")
      if key not in _FLOAT_KEYS and not isinstance(value, int):
        raise InputError(f"{name}={value!r} must be an int.")


def load_splits(config, data_dir: str, log=print) -> Splits:
  """The three splits, prepared under `data_dir` on first use (a damaged prepared
  dataset is announced through `log` and prepared again)."""
  options = dict(config.data.options)
  return Splits(
    *(
      data_lib.load_local(
        config.data.name, split, data_dir, config.data.max_len, log=log, **options
      )
      for split in datasets.SPLITS
    )
  )


_SPLITS_CACHE: dict[tuple[str, str], Splits] = {}


def _splits(config, workdir, log=print) -> Splits:
  """The three splits (prepared once under the data dir; memoized per process)."""
  data_dir = config.data_dir or os.path.join(workdir, "tfds")
  key = (json.dumps(config.data.to_dict(), sort_keys=True, default=list), data_dir)
  if key not in _SPLITS_CACHE:
    _SPLITS_CACHE.clear()
    if not parallel.is_main():  # process 0 prepares the TFDS dataset, the others read it
      parallel.sync(f"data {data_dir}")
    _SPLITS_CACHE[key] = load_splits(config, data_dir, log)
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
    return _splits(self.config, self.workdir, self.log)

  @functools.cached_property
  def experts(self) -> Experts:
    return phases.train_experts(self.config, self.splits, self._run)

  @functools.cached_property
  def caches(self) -> Caches:
    return phases.score(self.config, self.workdir, self.splits, self.experts, self.log)

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
  "train_gate": ("robust_gate", "erm_gate", "best_response"),
  "distill": ("student",),
  "train_baselines": ("monolithic", "monolithic_dro", "monolithic_large"),
  "evaluate": (),
}

# The config section whose `steps` each model trains for.
_SECTION = {
  "experts": "expert",
  "robust_gate": "gate",
  "erm_gate": "gate",
  "best_response": "gate",
  "student": "distill",
  "monolithic": "monolithic",
  "monolithic_dro": "monolithic",
  "monolithic_large": "monolithic_large",
}

# What the workdir builds from a model (its spec or fingerprint records the model's
# digest): training the model further makes them refuse to load.
_BUILT_FROM = {
  "experts": (
    "cache_validation.npz",
    "cache_test.npz",
    "robust_gate",
    "erm_gate",
    "best_response",
    "student",
    "monolithic",
    "monolithic_dro",
    "monolithic_large",
  ),
  "robust_gate": ("best_response", "student"),
}


def _refuse_extensions(config, workdir: str, names) -> None:
  """InputError, before any training, if one of the models `names` would train past
  its checkpoints while something built from its finished run is in the workdir.

  Extending it there would leave those unusable, and the run that built them could
  not be repeated; elsewhere (a new workdir with a copy of its directory) it resumes.
  """
  for name in names:
    steps = config[_SECTION[name]].steps
    saved = checkpoints.saved_steps(os.path.join(workdir, name))
    below = [s for s in saved if s < steps]
    if steps in saved or not below:  # restored as it is, or trained from scratch
      continue
    built = [b for b in _BUILT_FROM.get(name, ()) if os.path.exists(os.path.join(workdir, b))]
    if built:
      raise InputError(
        f"config.{_SECTION[name]}.steps={steps} would train {name} on from its checkpoint "
        f"at step {below[-1]}, but {', '.join(built)} in {workdir} were built from it and "
        f"would no longer load; nothing was changed. To continue {name}, copy "
        f"{os.path.join(workdir, name)} into a new --workdir and run there."
      )


def _start(config, workdir, log, phase) -> _Workdir:
  """Checks the config and the workdir, and says what runs where."""
  check_config(config)
  workdirs.create(workdir)
  _refuse_extensions(config, workdir, _TRAINS[phase])
  w = _Workdir(config, workdir, log, train=_TRAINS[phase])
  s = w.splits
  uncertainty_lib.from_config(config, s.train.num_domains)  # Λ checked before any work
  phases.dual_holdout(config, s.validation)  # and the dual holdout
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


def _finished(config, workdir: str, out):
  """`out`, once its phase has finished: the config it ran with is recorded then (a
  run refused on the way leaves the recorded one as it was)."""
  files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  return out


def train_experts(config, workdir: str, log=print) -> Experts:
  """Phase 1: the K experts, expert k on domain k (resumes from checkpoints)."""
  return _finished(config, workdir, _start(config, workdir, log, "train_experts").experts)


def train_gate(config, workdir: str, log=print) -> Gates:
  """Phase 2: caches, then the robust gate, the ERM gate and the best response."""
  return _finished(config, workdir, _start(config, workdir, log, "train_gate").gates)


def distill_student(config, workdir: str, log=print) -> Student:
  """Phase 3: the student, distilled from the robust gated model with weights λ̄."""
  return _finished(config, workdir, _start(config, workdir, log, "distill").student)


def train_baselines(config, workdir: str, log=print) -> Monoliths:
  """Phase 4: the monolithic baselines."""
  return _finished(config, workdir, _start(config, workdir, log, "train_baselines").monoliths)


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
    raise InputError(f"{workdir} has no config.json: no phase has finished there.")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
    raise InputError(
      f"{path} is damaged ({type(e).__name__}); run any phase there again (with the "
      f"config it ran with) to rewrite it."
    ) from e


def evaluate_all(config, workdir: str, log=print) -> dict:
  """Phase 5: every method on test with its intervals, the robust gate's certificate
  → results.json, the table and the plots (docs/math.md §6–§8)."""
  m = _start(config, workdir, log, "evaluate").models()
  domains, K = m.splits.test.domains, m.splits.test.num_domains
  lam_set = uncertainty_lib.from_config(config, K)
  robust, mono = m.gates.robust_gate, m.monoliths.monolithic
  scores, use = evaluate.methods_on_test(m, config.baseline)
  on_test = evaluate.results_on_test(scores, robust.state.lam_avg_K, lam_set, config.seed)
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
    **on_test,  # methods, bootstrap, certificate, lambda_rank_correlation
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
    provenance.INPUTS_KEY: provenance.models(workdir),
  }
  files.write_json(os.path.join(workdir, "results.json"), results)
  lam_history = {
    name: _lam_history(os.path.join(workdir, name), config[_SECTION[name]].steps, K, log)
    for name in ("robust_gate", "monolithic_dro")
  }
  if parallel.is_main():
    evaluate.plot(results, lam_history, workdir)
  log(evaluate.format_table(results))
  return _finished(config, workdir, results)


def _lam_history(directory: str, steps: int, K: int, log) -> np.ndarray:
  """λ at every step of a model's run, [steps, K] from its metrics.jsonl: NaN (a gap in
  the plot) at the steps whose rows the file lacks, which are announced."""
  rows = checkpoints.read_metrics(directory, up_to=steps)
  missing = checkpoints.missing_steps(rows, steps)
  if missing:
    log(
      f"note: {os.path.join(directory, 'metrics.jsonl')} lacks the metric rows of steps "
      f"{checkpoints.format_steps(missing)}: lambda.png leaves them out. Running its phase "
      f"again rebuilds them where a replay reproduces the run."
    )
  lam_SxK = np.full((steps, K), np.nan)
  for row in rows:
    lam_SxK[row["step"] - 1] = row["lam"]
  return lam_SxK


def run(config, workdir: str, log=print) -> dict:
  """Every phase in order; returns the results dict (also in workdir/results.json)."""
  timings = {}

  def timed(name, phase):
    t0 = time.perf_counter()
    out = phase(config, workdir, log)
    timings[name] = round(time.perf_counter() - t0, 2)
    return out

  check_config(config)
  workdirs.create(workdir)
  _refuse_extensions(config, workdir, [n for names in _TRAINS.values() for n in names])
  timed("train_experts", train_experts)
  timed("train_gate", train_gate)
  timed("distill", distill_student)
  timed("train_baselines", train_baselines)
  results = timed("evaluate", evaluate_all)
  results["seconds"] = timings
  files.write_json(os.path.join(workdir, "results.json"), results)
  return results
