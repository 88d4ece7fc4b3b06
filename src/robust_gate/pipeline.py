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
is refused before any training (robust_gate.preflight). A phase records the config it
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
  layout,
  parallel,
  phases,
  provenance,
  scoring,
  shards,
  summary,
  workdirs,
)
from robust_gate import data as data_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.experts import num_params
from robust_gate.preflight import check_config, refuse_extensions
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


def load_splits(config, data_dir: str, log=print) -> Splits:
  """The three splits, their token arrays memory-mapped from files under `data_dir`
  (`split_dir`; robust_gate.shards.open_split), so training reads rows from disk and a
  split need not fit in memory once written. The first call writes those files from the
  prepared dataset (robust_gate.datasets, prepared under `data_dir` on first use; a
  damaged one is announced through `log` and prepared again); a damaged split file is
  announced and written again. Every process calls it, in step."""
  directory = split_dir(config, data_dir)
  out = []
  for split in datasets.SPLITS:
    path = os.path.join(directory, split)
    if os.path.exists(os.path.join(path, "split.json")):
      try:
        out.append(shards.open_split(path, log))
        continue
      except InputError as e:
        log(f"{e} Writing it again from the prepared dataset.")
    out.append(_write_split(config, split, path, data_dir, log))
  return Splits(*out)


def split_dir(config, data_dir: str) -> str:
  """Where `load_splits` keeps the splits' token files: beside the prepared dataset's
  own directory, one per dataset, options and sequence length."""
  options = dict(config.data.options)
  prepared = datasets.prepared_dir(config.data.name, data_dir, **options)  # checks options
  return os.path.join(
    data_dir, "splits", os.path.relpath(prepared, data_dir), f"max_len_{config.data.max_len}"
  )


def _write_split(config, split: str, path: str, data_dir: str, log) -> data_lib.DomainData:
  """Process 0 writes one split's token files at `path` from the prepared dataset (which
  it prepares when missing), a block of sequences at a time (`shards.write_split_blocks`:
  the split is never in memory whole); every process then opens them."""
  if parallel.is_main():
    rows = shards.rows_per_shard(config.data.max_len * _BYTES_PER_TOKEN)

    def write(examples, domains, vocab):
      parts = data_lib.blocks(
        examples, domains=domains, vocab_size=vocab, max_len=config.data.max_len, rows=rows
      )
      shards.write_split_blocks(path, parts, len(examples))

    options = dict(config.data.options)
    data_lib.read_local(config.data.name, split, data_dir, write, log=log, **options)
  parallel.sync(f"split written {path}")
  return shards.open_split(path, log)


# A block's bytes per token: inputs and targets (int32) and the mask (bool).
_BYTES_PER_TOKEN = 9


_SPLITS_CACHE: dict[tuple[str, str], Splits] = {}


def _splits(config, workdir, log=print) -> Splits:
  """The three splits (`load_splits` under the data dir; memoized per process)."""
  data_dir = config.data_dir or os.path.join(workdir, "tfds")
  key = (json.dumps(config.data.to_dict(), sort_keys=True, default=list), data_dir)
  if key not in _SPLITS_CACHE:
    _SPLITS_CACHE.clear()
    _SPLITS_CACHE[key] = load_splits(config, data_dir, log)
  return _SPLITS_CACHE[key]


class _Workdir:
  """The models of one workdir, each built when first asked for: trained when its
  name is in `train`, restored otherwise (both by `phases.run_or_restore`)."""

  def __init__(self, config, workdir: str, log, train: Collection[str] = ()):
    self.config, self.workdir, self.log, self.train = config, workdir, log, frozenset(train)

  def _run(self, game: phases.Game):
    directory = os.path.join(self.workdir, game.name)
    saved = checkpoints.saved_steps(directory)
    trains = game.name in self.train and game.steps not in saved
    start = time.perf_counter()
    state = phases.run_or_restore(
      game,
      self.workdir,
      train=game.name in self.train,
      chunk=self.config.checkpoint_every,
      log=self.log,
    )
    if trains:  # a finished model restored keeps the time of the runs that trained it
      seconds = time.perf_counter() - start
      _record_seconds(self.workdir, game.name, seconds, add=bool(saved))
    return state

  @functools.cached_property
  def splits(self) -> Splits:
    return _splits(self.config, self.workdir, self.log)

  @functools.cached_property
  def experts(self) -> Experts:
    return phases.train_experts(self.config, self.splits, self._run)

  @functools.cached_property
  def caches(self) -> Caches:
    experts = self.experts  # restored first: its time is not the caches'
    stored = lambda stem: any(
      os.path.exists(os.path.join(self.workdir, p)) for p in (f"{stem}.npz", stem)
    )
    scored = all(stored(stem) for stem in layout.CACHE_STEMS)
    start = time.perf_counter()
    caches = scoring.score(self.config, self.workdir, self.splits, experts, self.log)
    if not scored:  # timed when they are computed, not when they are read back
      _record_seconds(self.workdir, "caches", time.perf_counter() - start)
    return caches

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


SECONDS_FILE = "seconds.json"


def _record_seconds(workdir: str, name: str, seconds: float, add: bool = False) -> None:
  """Records the wall seconds of `name`'s latest run in this workdir in SECONDS_FILE;
  with `add` (a run resumed from a checkpoint) on top of what its earlier runs recorded.
  The steps a killed run took after its last checkpoint are not counted: they are
  taken again, and timed, by the run that resumes."""
  seconds_by_name = _read_seconds(workdir)
  before = seconds_by_name.get(name, 0.0) if add else 0.0
  before = before if isinstance(before, (int, float)) else 0.0
  seconds_by_name[name] = round(before + seconds, 2)
  files.write_json(os.path.join(workdir, SECONDS_FILE), seconds_by_name)


def _read_seconds(workdir: str) -> dict[str, float]:
  try:
    with open(os.path.join(workdir, SECONDS_FILE)) as f:
      seconds = json.load(f)
  except (OSError, ValueError):  # absent or damaged: timings only, never an input
    return {}
  return seconds if isinstance(seconds, dict) else {}


def modular_overhead(seconds: dict[str, float]) -> float | None:
  """What being modular costs on top of training the experts: (caching their scores +
  fitting the robust gate) / training them, from per-model wall seconds; None where a
  timing is missing."""
  if not all(
    isinstance(seconds.get(k), (int, float)) for k in ("experts", "caches", "robust_gate")
  ):
    return None
  return (seconds["caches"] + seconds["robust_gate"]) / max(seconds["experts"], 1e-9)


def _start(config, workdir, log, phase) -> _Workdir:
  """Checks the config and the workdir, and says what runs where."""
  check_config(config)
  workdirs.create(workdir)
  trains = layout.trained_by(phase)
  refuse_extensions(config, workdir, trains)
  w = _Workdir(config, workdir, log, train=trains)
  s = w.splits
  uncertainty_lib.from_config(config, s.train.num_domains)  # Λ checked before any work
  scoring.dual_holdout(config, s.validation)  # and the dual holdout
  budget = config.get("device_budget_bytes")
  if budget is not None:
    log(
      f"config.device_budget_bytes={budget}: splits and caches larger than that stream from "
      "the host (robust_gate.streaming), with the same results."
    )
  if config.gate.dual_lr == 0 and phase == "train_gate":
    log(
      "note: config.gate.dual_lr=0, so the robust gate's λ stays at Λ's prior (the "
      "uniform mixture for the config's sets): it is trained as the ERM gate."
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
  """Phase 3: the student, distilled from the robust gated model (its domains weighted
  as config.distill.weights says)."""
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
  """The config the phases last ran with in `workdir` (workdir/config.json). A field
  added to a section since that file was written (`phases.ADDED`) is given the value
  every run had before it existed, so an older workdir's models load."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{workdir} has no config.json: no phase has finished there.")
  rewrite = "run any phase there again (with the config it ran with) to rewrite it."
  try:
    with open(path) as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path} is damaged ({type(e).__name__}); {rewrite}") from e
  if not isinstance(saved, dict):
    what = "null" if saved is None else type(saved).__name__
    raise InputError(f"{path} is damaged (JSON {what}, not an object); {rewrite}")
  try:
    config = ml_collections.ConfigDict(saved)
  except (TypeError, ValueError) as e:  # e.g. a key with a dot in it
    raise InputError(f"{path} is damaged ({type(e).__name__}: {e}); {rewrite}") from e
  for section, fields in phases.ADDED.items():
    for field, old in fields.items():
      if isinstance(saved.get(section), dict) and field not in saved[section]:
        config[section][field] = old
  return config


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
    "student_weights": config.distill.weights,  # its loss's domain weights (distill)
    "num_params": {
      "expert": num_params(m.experts.params) // K,
      "student": num_params(m.student.params),
      "gate": num_params(robust.params),
      "monolithic": num_params(mono.params),
      "monolithic_large": num_params(m.monoliths.monolithic_large.params),
    },
    "seconds_per_model": _read_seconds(workdir),
    "modular_overhead": modular_overhead(_read_seconds(workdir)),
    "provenance": provenance.collect(config).to_dict(),
    provenance.INPUTS_KEY: provenance.models(workdir),
  }
  files.write_json(os.path.join(workdir, "results.json"), results)
  lam_history = {
    name: _lam_history(
      os.path.join(workdir, name), config[layout.model(name).section].steps, K, log
    )
    for name in ("robust_gate", "monolithic_dro")
  }
  if parallel.is_main():
    summary.plot(results, lam_history, workdir)
  log(summary.format_table(results))
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
  refuse_extensions(config, workdir, layout.MODEL_DIRS)
  timed("train_experts", train_experts)
  timed("train_gate", train_gate)
  timed("distill", distill_student)
  timed("train_baselines", train_baselines)
  results = timed("evaluate", evaluate_all)
  results["seconds"] = timings
  files.write_json(os.path.join(workdir, "results.json"), results)
  return results
