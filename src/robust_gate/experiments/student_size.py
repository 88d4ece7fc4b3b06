"""Students of 1×, 2× and 4× one expert's parameters, distilled from the main job's
robust gated teacher (docs/math.md §5) on the data source validation picks: each one's
worst case and gap to the teacher on test, beside the single models of one expert's size.

Data sources of the student (each distilled at 1×, for every seed):

  train            the experts' training split: what the main job's student sees; the
                   experts fit it, so the teacher is sharper there than off it
  held_out         validation's part the gates are fitted to (`common.GateData.fit`): no
                   expert trained on it
  teacher_samples  sequences drawn token by token from the teacher itself (robust_gate
                   .students.teacher_samples), as many as `held_out` has unless told;
                   drawn once, from config.seed, and shared by every seed

The loss is the per-domain mean token KL(teacher ‖ student) weighted as the main job
distills (config.distill.weights: uniform, or the robust gate's λ̄; the `weights`
setting overrides it); a draw of the teacher belongs to no domain, so on its samples
the loss is one mean over them (the teacher's own mixture in place of the weights).
The source with the smallest mean worst case over seeds on validation's part no student
and no gate trained on (`Validation.selection`) is chosen; test is never read before
that choice, and its numbers for every source are outcomes. Then students of the
`sizes` (×, in parameters; robust_gate.students.scaled says which shape) are distilled
on the chosen source.

Every student starts from a random initialization (at config.seed the 1× student's is
the monolithic baselines'), never from an expert: its compute is then all in its own
steps, so that it compares with the monolithic models, which train from scratch. Its
steps and batch default to the monolithic baseline's (config.monolithic), so the 1×
student has the monolithic model's tokens × parameters; the larger ones the same tokens,
hence 2× and 4× that; the JSON states the ratios (`compute_over_monolithic`) and the
teacher's forward passes on top. The main job's own student (from an expert, on train)
is reported beside them.

On test, every student and the main job's models are scored as results.json scores
them (evaluate.results_on_test: the same key, resamples and intervals): each student's
worst case, its gap to the teacher (its worst case minus the robust gate's, paired on the
same resamples, `gap`), and its paired worst-case difference from the monolithic model
and the group-DRO model, both of one expert's size (`vs_monolithic`, `vs_monolithic_dro`;
negative: the student is better).
"""

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from robust_gate import bootstrap, distill, evaluate, experts, models, objectives, scoring, students
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError, check_int, check_real
from robust_gate.data import DomainData
from robust_gate.experiments import common, reporting, sequence_gate
from robust_gate.records import Caches, Monolithic, Scored, Student, TrainedModels

SOURCES = ("train", "held_out", "teacher_samples")
SIZES = (1, 2, 4)
TEACHER = evaluate.REFERENCE  # the robust gated model: every gap is from it
# The main job's models reported beside the students: the single models of one expert's
# size (the comparison the issue asks for), the large one and the main job's student.
SAME_SIZE = ("monolithic", "monolithic_dro")
BASELINES = (*SAME_SIZE, "monolithic_large", "student")
# Streams of a seed's key: phase 3's initialization (the monolithic models'), the samples'.
_INIT, _SAMPLES = 3, 24
SEEDS_NOTE = (
  "seeds vary the students' initialization and minibatches; the experts, the teacher and the "
  "baselines are the main job's one run, and the teacher's samples are drawn once, from "
  "config.seed"
)
CHOSEN_ON = (
  "the smallest mean over seeds of the 1× students' worst case on validation's selection part "
  "(no student or gate trained on it); test never chooses"
)
INITIALIZATION = (
  "random, from phase 3's stream of each seed: at config.seed the monolithic models' own"
)
FLOPS_NOTE = (
  "6 × parameters per trained token position for the student (2 for the teacher's forward "
  "passes, every expert); attention's own FLOPs left out"
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The experiment's knobs: the optional config section `student_size`, then `run`'s
  keyword arguments. Steps, batch and learning rate default to config.monolithic's (the
  same tokens as the monolithic baseline); `teacher_samples` 0: as many as `held_out`."""

  sources: tuple[str, ...] = SOURCES
  sizes: tuple[float, ...] = SIZES
  steps: int = 0  # student steps; 0: config.monolithic.steps
  per_domain: int = 0  # sequences per domain per step; 0: config.monolithic.per_domain
  lr: float = 0.0  # Adam learning rate; 0: config.monolithic.lr
  teacher_samples: int = 0  # sequences drawn from the teacher; 0: held_out's count
  sample_batch: int = 256  # sequences drawn together
  weights: str = ""  # the domains' weights (distill.DISTILL_WEIGHTS); "": config.distill's


def settings(config, **overrides) -> Settings:
  """Settings from `config.student_size` (where the config has it) and `overrides`, with
  the defaults filled in from config.monolithic; InputError naming a bad field."""
  section = config.get("student_size")
  given = {**(section.to_dict() if section is not None else {}), **overrides}
  fields = {f.name for f in dataclasses.fields(Settings)}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise InputError(f"student_size has no setting {unknown[0]!r}; it has {sorted(fields)}.")
  s = dataclasses.replace(Settings(), **given)
  sources = tuple(s.sources)
  if not sources or len(set(sources)) < len(sources) or not set(sources) <= set(SOURCES):
    raise InputError(f"student_size.sources={sources!r}: distinct names among {SOURCES}.")
  sizes = tuple(check_real(r, "student_size.sizes", 0.0, low_open=True) for r in s.sizes)
  weights = s.weights or config.distill.weights
  if weights not in distill.DISTILL_WEIGHTS:
    raise InputError(f"student_size.weights={weights!r}: one of {distill.DISTILL_WEIGHTS}.")
  if 1.0 not in sizes or len(set(sizes)) < len(sizes):
    raise InputError(f"student_size.sizes={s.sizes!r}: distinct ratios, 1 among them.")
  mc = config.monolithic
  return Settings(
    sources=sources,
    sizes=tuple(sorted(sizes)),
    steps=check_int(s.steps or mc.steps, "student_size.steps"),
    per_domain=check_int(s.per_domain or mc.per_domain, "student_size.per_domain"),
    lr=check_real(s.lr or mc.lr, "student_size.lr", 0.0, low_open=True),
    teacher_samples=check_int(s.teacher_samples, "student_size.teacher_samples", 0),
    sample_batch=check_int(s.sample_batch, "student_size.sample_batch"),
    weights=weights,
  )


@dataclasses.dataclass(frozen=True)
class Validation:
  """Validation as this experiment uses it: `held_out` what the `held_out` source trains
  on, `selection` where the sources are compared (disjoint from it, from train, and from
  what the gates are fitted to)."""

  held_out: DomainData
  selection: Scored
  selection_is: str


def validation_parts(config, caches: Caches) -> Validation:
  """The gates' fit part and the dual holdout (`common.GateData`); without a holdout
  (config.gate.dual_holdout 0), half of each domain's validation sequences, drawn from
  config.seed, is the selection part, with its own b_k, and the other half the source."""
  data = common.gate_data(caches)
  if data.dual is not None:
    return Validation(data.fit.data, data.dual, data.selection_is)
  va = caches.validation
  rng = np.random.default_rng(config.seed)
  chosen = np.zeros(len(va.data.domain_N), bool)
  for k, name in enumerate(va.data.domains):
    idx = rng.permutation(np.flatnonzero(va.data.domain_N == k))
    if len(idx) < 2:
      raise InputError(f"domain {name!r} has {len(idx)} validation sequence(s); need 2 to split.")
    chosen[idx[: len(idx) // 2]] = True
  part = va.subset(np.flatnonzero(chosen))
  selection = dataclasses.replace(
    part, baseline_K=scoring.baseline(config, part.cache_NxTxM, part.data)
  )
  return Validation(
    va.data.subset(np.flatnonzero(~chosen)),
    selection,
    "half of each domain's validation sequences (config.gate.dual_holdout is 0); the other "
    "half is the held_out source",
  )


@dataclasses.dataclass(frozen=True)
class Source:
  """What a student trains on: sequences, the λ weighting their domains, and the
  sequences per domain per step (the same sequences per step for every source)."""

  data: DomainData
  lam_K: np.ndarray
  per_domain: int


def sources(
  m: TrainedModels, parts: Validation, s: Settings, seed: int, log
) -> tuple[dict[str, Source], dict]:
  """({name: Source} for `s.sources`, a record of the teacher's samples ({} without),
  drawn from `seed`); the data's domains weighted as `s.weights` says."""
  lam_bar = np.asarray(m.gates.robust_gate.state.lam_avg_K, np.float64)
  lam_K = np.asarray(distill.student_weights(s.weights, lam_bar / lam_bar.sum()), np.float32)
  K = len(lam_K)
  out: dict[str, Source] = {}
  record: dict = {}
  for name in s.sources:
    if name == "train":
      out[name] = Source(m.splits.train, lam_K, s.per_domain)
    elif name == "held_out":
      out[name] = Source(parts.held_out, lam_K, s.per_domain)
    else:
      num = s.teacher_samples or len(parts.held_out.domain_N)
      drawn, record = draw_teacher(m, num, s.sample_batch, seed, log)
      out[name] = Source(drawn, np.ones(1, np.float32), K * s.per_domain)
  return out, record


def draw_teacher(
  m: TrainedModels, num: int, batch_size: int, seed: int, log
) -> tuple[DomainData, dict]:
  """`num` draws of the teacher, and what they cost and look like: seconds, mean tokens,
  the fraction ended by EOS within the context, and the fraction whose likeliest expert
  (the gate's posterior with a uniform prior, at the sequence's end) is each domain's."""
  ex, gate = m.experts, m.gates.robust_gate
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLES)
  start = time.perf_counter()
  drawn = students.teacher_samples(
    ex.lm_cfg, ex.params, gate.cfg, gate.params, key, num, batch_size
  )
  seconds = time.perf_counter() - start
  cache = experts.build_cache([ex.group], drawn)
  likeliest_N = np.argmax(cache.sum(axis=1), axis=-1)
  ended_N = np.any(drawn.mask_NxT & (drawn.targets_NxT == 0), axis=1)
  domains = m.splits.train.domains
  record = {
    "sequences": num,
    "seconds": round(seconds, 2),
    "mean_tokens": float(drawn.mask_NxT.sum(1).mean()),
    "ended_fraction": float(ended_N.mean()),
    "likeliest_expert_fraction": {
      d: float(np.mean(likeliest_N == j)) for j, d in enumerate(domains)
    },
  }
  log(f"student_size: {num} teacher samples in {seconds:.1f}s")
  return drawn, record


# Compiled once per architecture: every seed's initialization is one call.
_init_lm = jax.jit(models.init_lm, static_argnums=0)


def train_students(
  m: TrainedModels, cfg: models.LMConfig, src: Source, s: Settings, seeds, *, chunk, name, log
) -> tuple[list, float]:
  """A student of architecture `cfg` distilled on `src` for every seed: (its parameters
  per seed, mean seconds per seed), one line logged per seed. One step function serves
  every seed (their states differ only in initialization and key): one compilation."""
  ex, gate = m.experts, m.gates.robust_gate
  loss_fn = students.distill_loss_fn(
    ex.lm_cfg, ex.params, gate.cfg, gate.params, cfg, src.data, src.per_domain
  )
  step, params, seconds = None, [], []
  for seed in seeds:
    start = time.perf_counter()
    init = _init_lm(cfg, jax.random.fold_in(jax.random.PRNGKey(seed), _INIT))
    new_step, state = train_lib.make_game(
      loss_fn,
      init,
      num_domains=len(src.lam_K),
      lr=s.lr,
      dual_lr=0.0,
      seed=seed,
      lam_K=src.lam_K,
    )
    step = step or new_step
    state, history = train_lib.fit(
      step, state, s.steps, name=f"{name} seed={seed}", log=lambda line: None, chunk=chunk
    )
    params.append(state.params)
    seconds.append(time.perf_counter() - start)
    kl = " ".join(f"{x:.4f}" for x in history["losses"][-1])
    log(f"student_size: {name} seed={seed}: {s.steps} steps in {seconds[-1]:.1f}s, last KL [{kl}]")
  return params, float(np.mean(seconds))


def worst_case(logp_NxT, on: Scored, lam_set) -> float:
  """max over Λ of Σ λ_k L_k, bits per token, of log-probs on a scored split."""
  ce_K = evaluate.domain_ce(logp_NxT, on.data)
  return evaluate.method_entry(ce_K, on.baseline_K, lam_set, on.data.domains)["worst_case"]


def _bits(x) -> list[float]:
  return [float(v) for v in objectives.nats_to_bits(np.asarray(x, np.float64))]


def on_test(
  scores: evaluate.SequenceScores, lam_bar_K, lam_set, seed: int, names: list[str]
) -> tuple[dict, dict]:
  """(the entries of `names`, those of the teacher and BASELINES) on test: results.json's
  numbers and intervals (`evaluate.results_on_test`, key from `seed`), each student's with
  `gap` (its `vs_robust_gate` worst case) and its paired worst-case difference from each
  SAME_SIZE model [point, lo, hi] in bits."""
  methods = evaluate.results_on_test(scores, lam_bar_K, lam_set, seed)["methods"]
  key = evaluate.bootstrap_key(seed)

  def entry(name: str) -> dict[str, Any]:
    e = methods[name]
    out = {
      "worst_case": e["worst_case"],
      "worst_case_interval": e["intervals"]["worst_case"],
      "mean": e["mean"],
      "gap": e["vs_robust_gate"]["worst_case"],
    }
    if name not in (TEACHER, *SAME_SIZE):
      nll_N, b_K = scores.resampled(name)
      for other in SAME_SIZE:
        diff = bootstrap.paired(
          key, nll_N, scores.resampled(other)[0], scores.tokens_N, scores.domain_N, b_K, lam_set
        ).worst_case
        out[f"vs_{other}"] = _bits([diff.point, diff.low, diff.high])
    return out

  return {n: entry(n) for n in names}, {n: entry(n) for n in (TEACHER, *BASELINES)}


def _summary(per_seed: list[dict]) -> dict[str, Any]:
  """Mean ± sd over seeds of a student's numbers, and in how many seeds its gap to the
  teacher and its differences from the same-size models exceed the test set's noise."""
  points = [
    {
      **{k: r[k] for k in ("validation_worst_case", "validation_gap", "worst_case")},
      "gap": r["gap"][0],
      **{f"vs_{o}": r[f"vs_{o}"][0] for o in SAME_SIZE},
    }
    for r in per_seed
  ]
  beyond = lambda v: v[1] > 0 or v[2] < 0
  return {
    **common.across_seeds(points),
    "seeds_gap_beyond_noise": sum(beyond(r["gap"]) for r in per_seed),
    **{
      f"seeds_vs_{o}_beyond_noise": sum(beyond(r[f"vs_{o}"]) for r in per_seed) for o in SAME_SIZE
    },
  }


@dataclasses.dataclass(frozen=True)
class Students:
  """Students of one architecture, one per seed, and their worst cases on validation."""

  cfg: models.LMConfig
  params: list  # per seed
  validation_worst_case: list[float]  # per seed, bits per token
  seconds: float  # mean per seed


def distill_and_validate(
  m: TrainedModels,
  cfg: models.LMConfig,
  src: Source,
  sel: Scored,
  s: Settings,
  config,
  name: str,
  log=print,
) -> Students:
  """`train_students`, each student's worst case over Λ on `sel` measured as it is trained."""
  lam_set = uncertainty_lib.from_config(config, sel.data.num_domains)
  params, seconds = train_students(
    m, cfg, src, s, common.seeds(config), chunk=config.checkpoint_every, name=name, log=log
  )
  on_sel = [worst_case(students.lm_logprobs(cfg, p, sel.data), sel, lam_set) for p in params]
  return Students(cfg, params, on_sel, seconds)


def choose(trained: dict[str, Students], names) -> str:
  """The source whose 1× students have the smallest mean worst case on validation."""
  return min(names, key=lambda n: float(np.mean(trained[label(n, 1)].validation_worst_case)))


def label(source: str, ratio: float) -> str:
  """A student's method name: its source and its size in experts' parameters."""
  return f"student_{source}_{ratio:g}x"


def baseline(m: TrainedModels, name: str) -> Monolithic | Student:
  """The main job's model `name` of BASELINES."""
  return m.student if name == "student" else getattr(m.monoliths, name)


def score_on_test(
  config, m: TrainedModels, trained: dict[str, Students], teacher_validation: float
) -> tuple[list[dict], dict]:
  """Per seed, every student's test entry (`on_test`) with its validation worst case and
  gap; and the teacher's and BASELINES' entries (the same for every seed)."""
  te, gate = m.caches.test, m.gates.robust_gate
  lam_set = uncertainty_lib.from_config(config, te.data.num_domains)
  nll_N = lambda logp_NxT: evaluate.sequence_nll(logp_NxT, te.data)
  fixed = {
    n: nll_N(evaluate.gate_logprobs_and_usage(g.cfg, g.params, te.data, te.cache_NxTxM)[0])
    for n, g in ((TEACHER, gate), (evaluate.BEST_RESPONSE, m.gates.best_response))
  }
  for n in BASELINES:
    model = baseline(m, n)
    fixed[n] = nll_N(students.lm_logprobs(model.lm_cfg, model.params, te.data))
  per_seed: list[dict] = []
  baselines: dict = {}
  for i, seed in enumerate(common.seeds(config)):
    nll = dict(fixed)
    for name, st in trained.items():
      nll[name] = nll_N(students.lm_logprobs(st.cfg, st.params[i], te.data))
    scores = sequence_gate.sequence_scores(m, nll, config.baseline)
    entries, baselines = on_test(scores, gate.state.lam_avg_K, lam_set, config.seed, list(trained))
    for name, e in entries.items():
      e["validation_worst_case"] = trained[name].validation_worst_case[i]
      e["validation_gap"] = e["validation_worst_case"] - teacher_validation
    per_seed.append({"seed": seed, "students": entries})
  return per_seed, baselines


def run(config, workdir: str, log=print, **overrides) -> dict:
  """Every source at 1×, then every size on the chosen source, over every seed
  (`overrides`: fields of `Settings`)."""
  s = settings(config, **overrides)
  _, m = common.load(config, workdir)
  ex, gate, K = m.experts, m.gates.robust_gate, m.caches.test.data.num_domains
  lam_set = uncertainty_lib.from_config(config, K)
  parts = validation_parts(config, m.caches)
  sel = parts.selection
  teacher_validation = worst_case(
    evaluate.gate_logprobs_and_usage(gate.cfg, gate.params, sel.data, sel.cache_NxTxM)[0],
    sel,
    lam_set,
  )
  found, sample_record = sources(m, parts, s, config.seed, log)
  # Every source at 1×, chosen on validation before test is read; then the other sizes.
  trained = {}
  for n, src in found.items():
    trained[label(n, 1)] = distill_and_validate(m, ex.lm_cfg, src, sel, s, config, label(n, 1), log)
    log(
      f"student_size: {label(n, 1)}: validation worst case "
      f"{np.mean(trained[label(n, 1)].validation_worst_case):.4f} "
      f"(teacher {teacher_validation:.4f})"
    )
  chosen = choose(trained, s.sources)
  for r in (r for r in s.sizes if r != 1):
    cfg = students.scaled(ex.lm_cfg, r)
    trained[label(chosen, r)] = distill_and_validate(
      m, cfg, found[chosen], sel, s, config, label(chosen, r), log
    )
  per_seed, baselines = score_on_test(config, m, trained, teacher_validation)

  mc, expert_params = config.monolithic, experts.num_params(ex.params) // K
  # Sequences trained × parameters over the monolithic baseline's (every model trains on
  # the same context length, so positions and sequences give the same ratio).
  compute = lambda steps, per_step, p: (
    steps * per_step * p / (mc.steps * K * mc.per_domain * expert_params)
  )
  positions = s.steps * K * s.per_domain * config.data.max_len

  def summary(name: str) -> dict[str, Any]:
    return _summary([r["students"][name] for r in per_seed])

  def size_entry(r: float) -> dict[str, Any]:
    st = trained[label(chosen, r)]
    p = experts.num_params(st.params[0])
    return {
      "params": p,
      "params_over_expert": p / expert_params,
      **{k: getattr(st.cfg, k) for k in ("d_model", "num_layers", "num_heads", "d_ff")},
      "compute_over_monolithic": compute(s.steps, K * s.per_domain, p),
      "train_flops": 6.0 * p * positions,
      "teacher_flops": 2.0 * K * expert_params * positions,
      "seconds_per_seed": round(st.seconds, 2),
      **summary(label(chosen, r)),
    }

  large = m.monoliths.monolithic_large
  baseline_compute = {
    "monolithic": 1.0,
    "monolithic_dro": 1.0,
    "monolithic_large": compute(
      config.monolithic_large.steps,
      K * (config.monolithic_large.get("per_domain") or mc.per_domain),  # phases' rule
      experts.num_params(large.params),
    ),
    "student": compute(config.distill.steps, K * config.distill.per_domain, expert_params),
  }
  out: dict[str, Any] = {
    **common.seeded(config, SEEDS_NOTE),
    "units": "bits/token",
    "uncertainty": lam_set.kind,
    "teacher": "the main job's robust gate (its EMA) over the frozen experts",
    "selection_is": parts.selection_is,
    "selection_sequences": len(sel.data.domain_N),
    "chosen_on": CHOSEN_ON,
    "chosen_source": chosen,
    "steps": s.steps,
    "sequences_per_step": K * s.per_domain,
    "lr": s.lr,
    "weights": s.weights,
    "initialization": INITIALIZATION,
    "flops_note": FLOPS_NOTE,
    "expert_params": expert_params,
    "teacher_validation_worst_case": teacher_validation,
    "teacher_test_worst_case": baselines[TEACHER]["worst_case"],
    "teacher_test_worst_case_interval": baselines[TEACHER]["worst_case_interval"],
    "sources": {
      n: {
        "sequences": len(found[n].data.domain_N),
        "epochs": positions / config.data.max_len / len(found[n].data.domain_N),
        **summary(label(n, 1)),
      }
      for n in s.sources
    },
    "sizes": {f"{r:g}x": size_entry(r) for r in s.sizes},
    "baselines": {
      n: {
        "params": experts.num_params(baseline(m, n).params),
        **baselines[n],
        "compute_over_monolithic": baseline_compute[n],
      }
      for n in BASELINES
    },
    **({"teacher_samples": sample_record} if sample_record else {}),
    "per_seed": per_seed,
  }
  _log_tables(out, log)
  return reporting.write(config, workdir, "student_size", out, figure(out))


def _log_tables(out: dict[str, Any], log) -> None:
  src_rows = [
    (
      n,
      [
        reporting.pm(e["validation_worst_case"]),
        reporting.pm(e["worst_case"]),
        reporting.pm(e["gap"]),
      ],
    )
    for n, e in out["sources"].items()
  ]
  size_rows = [
    (
      f"{r} ({e['params']} params)",
      [
        reporting.pm(e["worst_case"]),
        reporting.pm(e["gap"]),
        reporting.pm(e["vs_monolithic"]),
        reporting.pm(e["vs_monolithic_dro"]),
        f"{e['compute_over_monolithic']:.2f}",
      ],
    )
    for r, e in out["sizes"].items()
  ]
  base_rows = [
    (n, [f"{e['worst_case']:.4f}", f"{e['gap'][0]:+.4f}", f"{e['compute_over_monolithic']:.2f}"])
    for n, e in out["baselines"].items()
  ]
  n = len(out["seeds"])
  log(
    f"student_size: 1x students per source (bits/token, mean ± sd over {n} seeds; chosen on "
    f"validation: {out['chosen_source']}):\n"
    + reporting.table(src_rows, ["val worst", "test worst", "test gap"])
    + f"\nstudents on {out['chosen_source']} by size (test; gap = student − teacher):\n"
    + reporting.table(size_rows, ["test worst", "gap", "− mono", "− DRO", "compute"])
    + f"\nthe main job's models (test; teacher worst {out['teacher_test_worst_case']:.4f}):\n"
    + reporting.table(base_rows, ["test worst", "gap", "compute"])
  )


def figure(out: dict[str, Any]):
  """The 1× students' worst case per source on validation and test (left); the gap to the
  teacher on test against parameters, mean ± sd over seeds, with the main job's models'
  gaps (right)."""
  fig, axes = reporting.plt().subplots(1, 2, figsize=(12, 4.2))
  names = list(out["sources"])
  x = np.arange(len(names))
  for i, (key, label) in enumerate(
    (("validation_worst_case", "validation"), ("worst_case", "test"))
  ):
    axes[0].bar(
      x + 0.4 * i,
      [out["sources"][n][key]["mean"] for n in names],
      0.4,
      yerr=[out["sources"][n][key]["sd"] for n in names],
      capsize=3,
      label=label,
    )
  axes[0].axhline(out["teacher_test_worst_case"], color="k", lw=0.8, label="teacher, test")
  axes[0].set_xticks(x + 0.2, names)
  axes[0].set(ylabel="worst-case L_k (bits/token)", title="1× students by data source")
  sizes = out["sizes"]
  axes[1].errorbar(
    [e["params"] for e in sizes.values()],
    [e["gap"]["mean"] for e in sizes.values()],
    yerr=[e["gap"]["sd"] for e in sizes.values()],
    fmt="o-",
    capsize=3,
    label=f"students on {out['chosen_source']}",
  )
  for i, (n, e) in enumerate(out["baselines"].items()):
    axes[1].plot([e["params"]], [e["gap"][0]], "s", color=f"C{i + 1}", label=n)
  axes[1].axhline(0, color="k", lw=0.5)
  axes[1].set(
    xscale="log",
    xlabel="parameters",
    ylabel="test worst case − teacher's (bits/token)",
    title=f"gap to the teacher (mean ± sd over {len(out['seeds'])} seeds)",
  )
  for ax in axes:
    ax.legend(fontsize=7)
  return fig
