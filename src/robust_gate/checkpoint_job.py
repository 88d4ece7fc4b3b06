"""The job for pre-trained experts: K checkpoint directories and K text datasets in, a
robust gate, its certificate and a servable student checkpoint out.

    config.experts = {"code": "/ckpt/code", "law": "/ckpt/law"}    # domain: checkpoint
    config.data.files = {"code": ["/data/code/**/*.py"], "law": ["/data/law"]}
    robust_gate.checkpoint_job.run(config, workdir)       # launch/checkpoints.py

What it does, reusing the main job's machinery (robust_gate.phases, scoring, evaluate):

1. loads the checkpoints (robust_gate.hf; refused unless they share a tokenizer) and
   the text, encoded with that tokenizer and split deterministically
   (robust_gate.checkpoint_data);
2. scores validation and test with every expert once (the caches, `scoring.score`;
   with `config.model_parallel` > 1, each expert's parameters split over that many
   devices, `score`), and fits the robust gate, the ERM gate and the best response to λ̄
   (`phases.train_gates`: checkpoints, resume, spec checks);
3. distills the robust gated model into a student of the experts' own family and
   shape, started from the expert of the domain with the largest λ̄
   (`distill.student_init`'s rule) and trained on the train split with the domain
   weights config.distill.weights names (`distill.student_weights`), the teacher's
   full next-token distributions computed on the fly (`distill.kl_loss_fn`; with
   `config.model_parallel` > 1, the experts' parameters still split,
   `distill_student`); exports it to `<workdir>/student_hf/`
   (robust_gate.hf.export: a checkpoint transformers loads as is);
4. evaluates every method on test (the gates, each expert, the uniform mixture, the
   student; all normalized models) with bootstrap intervals and the certificate
   (`evaluate.results_on_test`), into `<workdir>/results.json`.

Experts are the domains: expert k is domain k's (its b_k, with the default baseline).
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from robust_gate import (
  checkpoint_data,
  distill,
  evaluate,
  experts,
  files,
  models,
  parallel,
  phases,
  preflight,
  provenance,
  scoring,
  shards,
  streaming,
  workdirs,
)
from robust_gate import hf as hf_lib
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.data import DomainData
from robust_gate.records import Caches, Experts, Gate, Gates, Splits

STUDENT_DIR = "student_hf"
# The config file this job's users copy: it sets every field the job reads.
CONFIG_EXAMPLE = "launch/configs/checkpoints_example.py"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What `run` produced: the results dict (results.json) and the records behind it."""

  results: dict
  splits: Splits
  caches: Caches
  gates: Gates
  student: hf_lib.Model
  student_dir: str


def expert_paths(config) -> dict[str, str]:
  """config.experts as {domain: checkpoint directory}, refused when empty or not text."""
  named = dict(config.experts)
  if not named:
    raise InputError("config.experts is empty: name one checkpoint directory per domain.")
  for name, path in named.items():
    if not isinstance(path, str):
      raise InputError(f"config.experts[{name!r}] must be a checkpoint directory, not {path!r}.")
  return named


def text_data(config) -> checkpoint_data.TextData:
  d = config.data
  files_by_domain = {k: list(v) if not isinstance(v, str) else [v] for k, v in d.files.items()}
  return checkpoint_data.TextData(files_by_domain, d.max_len, d.validation, d.test, d.split_by)


def model_mesh(config) -> Mesh | None:
  """The data × model mesh of `config.model_parallel` (absent: 1), or None for 1: the
  main job's data parallelism, parameters whole on every device."""
  model_parallel = config.get("model_parallel", 1)
  if model_parallel == 1:
    return None
  try:
    return hf_lib.sharding.mesh(model_parallel)
  except InputError as e:
    raise InputError(f"config.{e}") from None


def load_experts(config) -> dict[str, hf_lib.Model]:
  """The checkpoints by domain (one tokenizer), checked against the sequence length;
  with `config.model_parallel` > 1 split over the model axis as they are read."""
  mesh = model_mesh(config)
  place = None if mesh is None else hf_lib.sharding.placer(mesh)
  loaded = hf_lib.load_models(expert_paths(config), config.dtype, place)
  for name, m in loaded.items():
    if isinstance(m.config, hf_lib.gpt2.Config) and m.config.max_len < config.data.max_len:
      raise InputError(
        f"config.data.max_len={config.data.max_len} exceeds expert {name!r}'s context "
        f"(n_positions={m.config.max_len})."
      )
  return loaded


def experts_record(loaded: dict[str, hf_lib.Model]) -> Experts:
  """The checkpoints as the `Experts` record scoring and the gates read (its group and
  digest). They are not robust_gate's own transformers: `lm_cfg` is absent, and only
  the main job's phases that build such models (none here) would read it."""
  return Experts(
    lm_cfg=cast(models.LMConfig, None), params=loaded, group=hf_lib.expert_group(loaded)
  )


def score(config, workdir: str, splits: Splits, record: Experts, log=print) -> Caches:
  """`scoring.score` (the caches, b_k, validation's two parts). With model_parallel > 1
  the caches are first written by `hf.sharding.score`, where and as `scoring.score`
  keeps them (the same fingerprint; one file, or row shards over
  `config.device_budget_bytes`), so it reads them instead of scoring with the
  parameters whole on every device."""
  mesh = model_mesh(config)
  if mesh is not None:
    loaded = cast(dict[str, hf_lib.Model], record.params)
    for split in ("validation", "test"):
      stem = os.path.join(workdir, f"cache_{split}")
      d = getattr(splits, split)
      write_sharded_cache(
        stem, loaded, record.group, d, mesh, config.get("device_budget_bytes"), log
      )
  return scoring.score(config, workdir, splits, record, log)


def write_sharded_cache(
  stem: str,
  loaded: Mapping[str, hf_lib.Model],
  group: experts.Expert,
  d: DomainData,
  mesh: Mesh,
  budget_bytes: int | None,
  log,
) -> None:
  """The cache `experts.stored_scores(stem, [group], d)` reads, scored with split
  parameters: `stem`.npz when it fits `budget_bytes` (None: any), else row shards in
  `stem`/. A valid one is kept; a damaged one is announced and scored again; one of
  other data or experts is left for `scoring.score` to refuse."""
  fingerprint = experts.cache_fingerprint(d, [group])
  M = len(loaded)
  if budget_bytes is None or experts.cache_bytes(d, [group]) <= budget_bytes:
    path = f"{stem}.npz"
    parallel.sync(f"cache {path}")  # every process takes the same branch
    if os.path.exists(path):
      try:
        experts.load_cache(path, fingerprint, d, M)
        return
      except experts.DamagedCacheError as e:
        log(f"cache {path} is damaged ({e}); rebuilding it.")
    experts.save_cache(path, hf_lib.sharding.score(loaded, d, mesh), fingerprint)
    return
  N, T = d.inputs_NxT.shape
  shards.build(
    stem,
    fingerprint=fingerprint,
    shape=(N, T, M),
    dtype=np.float32,
    shard_rows=shards.rows_per_shard(T * M * 4),  # experts.sharded_scores' layout
    compute=lambda lo, hi: hf_lib.sharding.score(loaded, d.subset(np.arange(lo, hi)), mesh),
    log=log,
    name=f"cache {stem}",
  )


def _runner(config, workdir: str, log) -> phases.Runner:
  return lambda game: phases.run_or_restore(
    game, workdir, train=True, chunk=config.checkpoint_every, log=log
  )


def teacher_fn(loaded: dict[str, hf_lib.Model], robust: Gate):
  """The robust gated model's next-token log-distributions, (x, y, mask) -> [B, T, V]."""
  members = tuple(loaded.values())

  def teacher(x_BxT, y_BxT, m_BxT):
    logp_BxTxMxV = jnp.stack([hf_lib.next_token_logprobs(m, x_BxT) for m in members], axis=2)
    return distill.gated_next_token_logprobs(
      logp_BxTxMxV, robust.cfg, robust.params, x_BxT, y_BxT, m_BxT
    )

  return teacher


def distill_student(
  config,
  splits: Splits,
  loaded: dict[str, hf_lib.Model],
  caches: Caches,
  robust: Gate,
  run,
  mesh: Mesh | None = None,
) -> tuple[hf_lib.Model, int]:
  """The student (the family and shape of the expert it starts from: the one of the
  domain with the largest λ̄; float32 parameters) and that expert's index.

  With `mesh` (`model_mesh`), the teacher's parameters stay split over its model axis,
  as `load_experts` placed them: the compiled step takes them as they are
  (robust_gate.closures) and each batch is split over the data axis only
  (`distill.kl_loss_fn`), so the teacher, M experts, is never gathered whole onto a
  device. The student's own parameters and optimizer state, one expert in float32,
  are whole on every device of the mesh: they start so, and are returned so (XLA may
  split the step's outputs between chunks)."""
  lam_bar_K = robust.state.lam_avg_K
  init_from = int(jnp.argmax(lam_bar_K))
  start = list(loaded.values())[init_from]
  start = dataclasses.replace(
    start, params=jax.tree.map(lambda a: a.astype(jnp.float32), start.params)
  )
  student_fn = lambda params, x: hf_lib.next_token_logprobs(
    dataclasses.replace(start, params=params), x
  )
  dc = config.distill
  source = streaming.choose(splits.train, budget_bytes=config.get("device_budget_bytes"))
  loss_fn = distill.kl_loss_fn(teacher_fn(loaded, robust), student_fn, source, dc.per_domain, mesh)
  step, state = train_lib.make_game(
    loss_fn,
    start.params,
    num_domains=splits.train.num_domains,
    lr=dc.lr,
    dual_lr=0.0,
    seed=config.seed,
    lam_K=distill.student_weights(dc.weights, lam_bar_K),
  )
  if mesh is not None:  # on the teacher's mesh, as the step's other arguments
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  spec = {  # the main job's student spec (phases.distill_student), the same keys
    **phases._common_spec(config),
    "experts": caches.experts.digest,
    "robust_gate": experts.params_fingerprint(robust.state),
    "distill": phases._section(config, "distill"),
    "dtype": config.dtype,
  }
  params = run(phases.Game("student", step, state, dc.steps, spec)).params
  if mesh is not None:
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  return dataclasses.replace(start, params=params), init_from


def _uniform_mixture(cache_NxTxM) -> np.ndarray:
  M = cache_NxTxM.shape[-1]
  uniform = np.full(cache_NxTxM.shape, -np.log(M), np.float32)
  return evaluate.fixed_gate_logprobs(uniform, np.asarray(cache_NxTxM))


def scores_on_test(
  caches: Caches, gates: Gates, student: hf_lib.Model, baseline: str, mesh: Mesh | None = None
):
  """Every method's per-sequence NLL on test (`evaluate.SequenceScores`), and gate usage;
  the student scored with its parameters split over `mesh` (None: whole)."""
  te, cache = caches.test.data, caches.test.cache_NxTxM
  nll_N, use = {}, {}
  for name, gate in gates.items():
    logp, use[name] = evaluate.gate_logprobs_and_usage(gate.cfg, gate.params, te, cache)
    nll_N[name] = evaluate.sequence_nll(logp, te)
  nll_N["uniform_mixture"] = evaluate.sequence_nll(_uniform_mixture(cache), te)
  for j, d in enumerate(te.domains):
    nll_N[f"expert:{d}"] = evaluate.sequence_nll(cache[..., j], te)
  if mesh is None:
    student_NxT = experts.build_cache([hf_lib.expert(student, "student")], te)[..., 0]
  else:
    student_NxT = hf_lib.sharding.score({"student": student}, te, mesh)[..., 0]
  nll_N["student"] = evaluate.sequence_nll(student_NxT, te)
  own_NxT = np.take_along_axis(np.asarray(cache), te.domain_N[:, None, None], axis=-1)[..., 0]
  scores = evaluate.SequenceScores(
    nll_N=nll_N,
    tokens_N=te.mask_NxT.sum(axis=1),
    domain_N=te.domain_N,
    domains=tuple(te.domains),
    baseline_K=np.asarray(caches.test.baseline_K),
    baseline_nll_N=evaluate.sequence_nll(own_NxT, te) if baseline == "expert" else None,
  )
  return scores, use


def run(config, workdir: str, log=print, warm_start=None) -> Outcome:
  """The whole job in `workdir` (resumes; see the module's docstring). `warm_start`:
  a function from the fresh robust gate's parameters to its initial ones
  (robust_gate.checkpoint_edits, for an expert added to a fitted gate)."""
  preflight.check_sections(config, ("gate", "distill"), example=CONFIG_EXAMPLE)
  workdirs.create(workdir)
  loaded = load_experts(config)
  domains = list(loaded)
  tok = next(iter(loaded.values())).tokenizer
  vocab = next(iter(loaded.values())).config.vocab_size
  splits = checkpoint_data.load_splits(text_data(config), domains, tok, vocab)
  uncertainty = uncertainty_lib.from_config(config, len(domains))
  scoring.dual_holdout(config, splits.validation)  # checked before any scoring
  log(
    f"checkpoint job: experts {domains} ({', '.join(m.family for m in loaded.values())}), "
    f"sequences train {splits.train.counts().tolist()}, validation "
    f"{splits.validation.counts().tolist()}, test {splits.test.counts().tolist()}"
  )
  mesh = model_mesh(config)
  if mesh is not None:
    params = [m.params for m in loaded.values()]
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    log(
      f"experts' parameters ({total} bytes) split over the mesh {dict(mesh.shape)}: "
      f"{max(hf_lib.sharding.device_bytes(params).values())} bytes on the fullest device"
    )
  caches = score(config, workdir, splits, experts_record(loaded), log)
  run_game = _runner(config, workdir, log)
  if warm_start is not None:
    inner = run_game
    run_game = lambda g: inner(warm_start(g) if g.name == "robust_gate" else g)
  gates = phases.train_gates(config, caches, run_game)
  student, init_from = distill_student(
    config, splits, loaded, caches, gates.robust_gate, _runner(config, workdir, log), mesh
  )
  student_dir = hf_lib.export.save(student, os.path.join(workdir, STUDENT_DIR))
  log(f"student ({student.family}, from expert {domains[init_from]!r}) exported to {student_dir}")
  scores, use = scores_on_test(caches, gates, student, config.baseline, mesh)
  lam_bar_K = gates.robust_gate.state.lam_avg_K
  on_test = evaluate.results_on_test(scores, lam_bar_K, uncertainty, config.seed)
  results = {
    "units": "bits/token",
    "baseline": config.baseline,
    "uncertainty": uncertainty.kind,
    "domains": domains,
    "experts": dict(expert_paths(config)),
    "families": {d: m.family for d, m in loaded.items()},
    "lambda_bar": dict(zip(domains, map(float, lam_bar_K))),
    "worst_case": {n: m["worst_case"] for n, m in on_test["methods"].items()},
    **on_test,
    "gate_usage": {k: v.tolist() for k, v in use.items()},
    "student": {
      "init_from": domains[init_from],
      "weights": config.distill.weights,  # its loss's domain weights (distill)
      "family": student.family,
      "path": student_dir,
    },
    "num_params": {
      "student": experts.num_params(student.params),
      "gate": experts.num_params(gates.robust_gate.params),
      **{f"expert:{d}": experts.num_params(m.params) for d, m in loaded.items()},
    },
    "provenance": provenance.collect(config).to_dict(),
  }
  files.write_json(os.path.join(workdir, "results.json"), results)
  files.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  log(format_worst_cases(results))
  return Outcome(results, splits, caches, gates, student, student_dir)


def format_worst_cases(results: dict) -> str:
  """One line per method: worst case and mean over the domains, bits/token over b_k."""
  cert = results["certificate"]
  lines = [f"{'method':<24} {'worst case':>11} {'mean':>8}   (bits/token over b_k, test)"]
  for name, m in sorted(results["methods"].items(), key=lambda kv: kv[1]["worst_case"]):
    lines.append(f"{name:<24} {m['worst_case']:>11.4f} {m['mean']:>8.4f}")
  lines.append(
    f"certificate: upper {cert['upper'][0]:.4f}, lower {cert['lower'][0]:.4f} (estimate), "
    f"gap {cert['gap'][0]:.4f} [{cert['gap'][1]:.4f}, {cert['gap'][2]:.4f}]"
  )
  return "\n".join(lines)
