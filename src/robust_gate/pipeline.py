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
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import checkpoints, datasets, distill, evaluate, experts, gating, models, parallel
from robust_gate import data as data_lib
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError


def _lm_config(c, vocab_size, max_len, dtype) -> models.LMConfig:
  return models.LMConfig(
    vocab_size=vocab_size,
    max_len=max_len,
    d_model=c.d_model,
    num_layers=c.num_layers,
    num_heads=c.num_heads,
    d_ff=c.d_ff,
    dtype=dtype,
  )


def _num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


_FLOAT_KEYS = ("lr", "dual_lr", "dro_dual_lr", "ema_decay")


def check_config(config) -> None:
  """Positive sizes and step counts, finite positive learning rates, η ≥ 0, an EMA
  decay in [0, 1)."""
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


def load_splits(config, data_dir: str) -> dict:
  options = dict(config.data.options)
  return {
    split: data_lib.load_local(config.data.name, split, data_dir, config.data.max_len, **options)
    for split in datasets.SPLITS
  }


_SPLITS_CACHE: dict[tuple[str, str], dict] = {}


def _splits(config, workdir):
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


def _section(config, name):
  """A config section as a dict, without `steps` (more steps extend a run)."""
  return {k: v for k, v in config[name].to_dict().items() if k != "steps"}


def _common_spec(config):
  return {"seed": config.seed, "data": config.data.to_dict()}


def _phase(config, workdir, name, step_fn, state, steps, spec, log, *, train):
  """Trains (resuming) or, with train=False, restores the finished phase `name`."""
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, name), spec, name=name, log=log, create=train
  )
  if train:
    state, _ = train_lib.fit(
      step_fn, state, steps, name=name, log=log, chunk=config.checkpoint_every, checkpointer=ckpt
    )
    return state
  restored = ckpt.restore(state, step=steps)
  if restored is None:
    raise InputError(
      f"{name}: no finished run in {workdir} (no checkpoint at step "
      f"{steps}, the config's last): run its phase first, or "
      f"launch/main.py, which runs every phase."
    )
  return restored


def _experts(config, workdir, log, *, train=False):
  tr = _splits(config, workdir)["train"]
  ec = config.expert
  lm_cfg = _lm_config(ec, tr.vocab_size, config.data.max_len, config.dtype)
  step, state = train_lib.make_game(
    train_lib.expert_loss_fn(lm_cfg, tr, ec.per_domain),
    models.init_stacked_lm(lm_cfg, jax.random.fold_in(_key(config), 1), tr.num_domains),
    num_domains=tr.num_domains,
    lr=ec.lr,
    dual_lr=0.0,
    seed=config.seed,
  )
  spec = {**_common_spec(config), "expert": _section(config, "expert"), "dtype": config.dtype}
  state = _phase(config, workdir, "experts", step, state, ec.steps, spec, log, train=train)
  return lm_cfg, state.params


def _key(config):
  return jax.random.PRNGKey(config.seed)


def _caches(config, workdir, log):
  """Experts, caches and baselines b_k of validation and test."""
  s = _splits(config, workdir)
  lm_cfg, expert_params = _experts(config, workdir, log)
  group = experts.transformer_experts(lm_cfg, expert_params, s["train"].domains)
  out = {"lm_cfg": lm_cfg, "expert_params": expert_params, "digest": group.fingerprint}
  for split in ("validation", "test"):
    out[split] = experts.cached_scores(
      os.path.join(workdir, f"cache_{split}.npz"), [group], s[split]
    )
    out[f"baseline_{split}"] = _baseline(config, out[split], s[split])
  return out


def _gate_config(config, K, V) -> models.GateConfig:
  gc = config.gate
  return models.GateConfig(
    num_experts=K,
    vocab_size=V,
    max_len=config.data.max_len,
    hidden=gc.hidden,
    token_embed=gc.token_embed,
    pos_embed=gc.pos_embed,
  )


def _uncertainty_spec(config):
  return {k: config[k] for k in ("uncertainty", "box_lo", "box_hi", "kl_radius")}


def _gates(config, workdir, log, c, *, train=False):
  """The robust gate and the ERM gate: {name: (GameState, loss_fn)}.

  The gate that is evaluated, distilled and reported is `state.ema_params`, the EMA
  of w with `config.gate.ema_decay` (docs/math.md §4); at 0 it is the last iterate.
  """
  va = _splits(config, workdir)["validation"]
  K = va.num_domains
  gate_cfg = _gate_config(config, K, va.vocab_size)
  gc = config.gate
  loss_fn = train_lib.gate_loss_fn(
    gate_cfg, va, c["validation"], gc.per_domain, jnp.asarray(c["baseline_validation"], jnp.float32)
  )
  lam_set = uncertainty_lib.from_config(config, K)
  gates = {}
  for name, dual_lr in (("robust_gate", gc.dual_lr), ("erm_gate", 0.0)):
    step, state = train_lib.make_game(
      loss_fn,
      models.init_gate(gate_cfg, jax.random.fold_in(_key(config), 2)),
      num_domains=K,
      lr=gc.lr,
      dual_lr=dual_lr,
      seed=config.seed,
      uncertainty=lam_set if dual_lr else None,  # ERM: the uniform mixture
      ema_decay=gc.ema_decay,
    )
    spec = {
      **_common_spec(config),
      "experts": c["digest"],
      "baseline": config.baseline,
      "gate": {**_section(config, "gate"), "dual_lr": dual_lr},
      **(_uncertainty_spec(config) if dual_lr else {}),
    }
    gates[name] = (
      _phase(config, workdir, name, step, state, gc.steps, spec, log, train=train),
      loss_fn,
    )
  return gate_cfg, gates


def _student(config, workdir, log, c, gate_cfg, robust, *, train=False):
  tr = _splits(config, workdir)["train"]
  dc = config.distill
  lam_bar = robust.lam_avg_K
  params, init_from = distill.student_init(c["expert_params"], lam_bar)
  step, state = train_lib.make_game(
    distill.distill_loss_fn(
      c["lm_cfg"], c["expert_params"], gate_cfg, robust.ema_params, tr, dc.per_domain
    ),
    params,
    num_domains=tr.num_domains,
    lr=dc.lr,
    dual_lr=0.0,
    seed=config.seed,
    lam_K=lam_bar / jnp.sum(lam_bar),
  )
  spec = {
    **_common_spec(config),
    "experts": c["digest"],
    "robust_gate": experts.params_fingerprint(robust),
    "distill": _section(config, "distill"),
    "dtype": config.dtype,
  }
  state = _phase(config, workdir, "student", step, state, dc.steps, spec, log, train=train)
  return state.params, init_from


def _monolithic(config, workdir, log, c, *, train=False):
  """{name: (LMConfig, params, loss_fn)} of the three monolithic baselines."""
  s = _splits(config, workdir)
  tr, K = s["train"], s["train"].num_domains
  mc, lc = config.monolithic, config.monolithic_large
  lam_set = uncertainty_lib.from_config(config, K)
  out = {}
  for name, cfg, section, dual_lr in (
    ("monolithic", c["lm_cfg"], "monolithic", 0.0),
    ("monolithic_dro", c["lm_cfg"], "monolithic", mc.dro_dual_lr),
    (
      "monolithic_large",
      _lm_config(lc, tr.vocab_size, config.data.max_len, config.dtype),
      "monolithic_large",
      0.0,
    ),
  ):
    sc = config[section]
    loss_fn = train_lib.monolithic_loss_fn(
      cfg, tr, mc.per_domain, jnp.asarray(c["baseline_validation"], jnp.float32)
    )
    step, state = train_lib.make_game(
      loss_fn,
      models.init_lm(cfg, jax.random.fold_in(_key(config), 3)),
      num_domains=K,
      lr=sc.lr,
      dual_lr=dual_lr,
      seed=config.seed,
      uncertainty=lam_set if dual_lr else None,
    )
    spec = {
      **_common_spec(config),
      "experts": c["digest"],
      "baseline": config.baseline,
      "model": cfg.spec(),  # without LMConfig.attention: old workdirs stay valid
      "lr": sc.lr,
      "dual_lr": dual_lr,
      "per_domain": mc.per_domain,
      **(_uncertainty_spec(config) if dual_lr else {}),
    }
    state = _phase(config, workdir, name, step, state, sc.steps, spec, log, train=train)
    out[name] = (cfg, state.params, loss_fn)
  return out


def _start(config, workdir, log, phase):
  check_config(config)
  try:
    if parallel.is_main():
      os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot use --workdir={workdir!r}: {e.strerror}.") from e
  checkpoints.atomic_write(
    os.path.join(workdir, "config.json"), json.dumps(config.to_dict(), indent=1, default=list)
  )
  s = _splits(config, workdir)
  uncertainty_lib.from_config(config, s["train"].num_domains)  # Λ checked before any work
  if config.gate.dual_lr == 0 and phase == "train_gate":
    log(
      "note: config.gate.dual_lr=0, so the robust gate is trained as the ERM gate "
      "(λ fixed at Λ's prior)."
    )
  log(
    f"{phase}: {jax.device_count()} {jax.devices()[0].platform} device(s) in "
    f"{jax.process_count()} process(es), data "
    f"{config.data.name}, domains {list(s['train'].domains)}, train "
    f"{s['train'].counts().tolist()}, validation {s['validation'].counts().tolist()}, "
    f"test {s['test'].counts().tolist()}"
  )


def train_experts(config, workdir: str, log=print):
  """Phase 1: the K experts, expert k on domain k (resumes from checkpoints)."""
  _start(config, workdir, log, "train_experts")
  return _experts(config, workdir, log, train=True)[1]


def train_gate(config, workdir: str, log=print):
  """Phase 2: caches, then the robust and the ERM gate. Returns {name: GameState}."""
  _start(config, workdir, log, "train_gate")
  c = _caches(config, workdir, log)
  _, gates = _gates(config, workdir, log, c, train=True)
  return {name: g[0] for name, g in gates.items()}


def distill_student(config, workdir: str, log=print):
  """Phase 3: the student, distilled from the robust gated model with weights λ̄."""
  _start(config, workdir, log, "distill")
  c = _caches(config, workdir, log)
  gate_cfg, gates = _gates(config, workdir, log, c)
  return _student(config, workdir, log, c, gate_cfg, gates["robust_gate"][0], train=True)[0]


def train_baselines(config, workdir: str, log=print):
  """Phase 4: the monolithic baselines. Returns {name: params}."""
  _start(config, workdir, log, "train_baselines")
  c = _caches(config, workdir, log)
  return {k: v[1] for k, v in _monolithic(config, workdir, log, c, train=True).items()}


def load_models(config, workdir: str, log=print) -> dict:
  """Everything the phases trained in `workdir`, restored (for evaluation, notebooks).

  Returns a dict with: splits, lm_cfg, expert_params (stacked), gate_cfg, gates
  ({robust_gate, erm_gate: GameState}), gate_loss (the gates' loss function),
  student_params, student_init (index of the expert it started from),
  monolithic ({name: (LMConfig, params, loss_fn)}), caches (validation, test) and
  baselines b_k (nats) of both splits.
  """
  c = _caches(config, workdir, log)
  gate_cfg, gates = _gates(config, workdir, log, c)
  robust, gate_loss = gates["robust_gate"]
  student_params, init_from = _student(config, workdir, log, c, gate_cfg, robust)
  return {
    "splits": _splits(config, workdir),
    "lm_cfg": c["lm_cfg"],
    "expert_params": c["expert_params"],
    "gate_cfg": gate_cfg,
    "gates": {k: v[0] for k, v in gates.items()},
    "gate_loss": gate_loss,
    "student_params": student_params,
    "student_init": init_from,
    "monolithic": _monolithic(config, workdir, log, c),
    "cache": {"validation": c["validation"], "test": c["test"]},
    "baseline": {"validation": c["baseline_validation"], "test": c["baseline_test"]},
  }


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
  _start(config, workdir, log, "evaluate")
  m = load_models(config, workdir, log)
  te = m["splits"]["test"]
  domains, K = te.domains, te.num_domains
  lam_set = uncertainty_lib.from_config(config, K)
  cache_te, baseline_te = m["cache"]["test"], m["baseline"]["test"]
  gate_cfg, gates, mono = m["gate_cfg"], m["gates"], m["monolithic"]
  robust, gate_loss = gates["robust_gate"], m["gate_loss"]
  student_params, init_from = m["student_params"], m["student_init"]
  expert_params = m["expert_params"]

  methods, use = {}, {}
  entry = lambda logp: evaluate.method_entry(
    evaluate.domain_ce(logp, te), baseline_te, lam_set, domains
  )
  for name in ("robust_gate", "erm_gate"):
    logp, use[name] = evaluate.gate_logprobs_and_usage(
      gate_cfg, gates[name].ema_params, te, cache_te
    )
    methods[name] = entry(logp)
  uniform = np.full(cache_te.shape, -np.log(K), np.float32)
  methods["uniform_mixture"] = entry(evaluate.fixed_gate_logprobs(uniform, cache_te))
  posterior = np.asarray(
    gating.posterior_log_gate(
      jnp.zeros(K), models.prefix_loglik(cache_te, te.mask_NxT).reshape(-1, K)
    )
  )
  posterior = posterior.reshape(cache_te.shape)
  methods["posterior_gate"] = entry(evaluate.fixed_gate_logprobs(posterior, cache_te))
  use["posterior_gate"] = evaluate.usage(np.exp(posterior), te)
  for name in ("monolithic", "monolithic_large", "monolithic_dro"):
    cfg, params, _ = mono[name]
    methods[name] = entry(evaluate.lm_logprobs(cfg, params, te))
  methods["student"] = entry(evaluate.lm_logprobs(m["lm_cfg"], student_params, te))
  for j, d in enumerate(domains):
    methods[f"expert:{d}"] = entry(cache_te[..., j])

  conflict_key = jax.random.PRNGKey(config.seed + 17)
  results = {
    "units": "bits/token",
    "baseline": config.baseline,
    "uncertainty": lam_set.kind,
    "dataset": config.data.name,
    "domains": list(domains),
    "experts": list(domains),
    "lambda_bar": dict(zip(domains, map(float, robust.lam_avg_K))),
    "lambda_last": dict(zip(domains, map(float, robust.lam_K))),
    "methods": methods,
    "gate_usage": {k: v.tolist() for k, v in use.items()},
    "gradient_conflict": {
      "monolithic": evaluate.gradient_conflict(
        mono["monolithic"][2], mono["monolithic"][1], conflict_key
      ).tolist(),
      "gate": evaluate.gradient_conflict(gate_loss, robust.ema_params, conflict_key).tolist(),
    },
    "student_init": domains[init_from],
    "num_params": {
      "expert": _num_params(expert_params) // K,
      "student": _num_params(student_params),
      "gate": _num_params(robust.ema_params),
      "monolithic": _num_params(mono["monolithic"][1]),
      "monolithic_large": _num_params(mono["monolithic_large"][1]),
    },
  }
  evaluate.write_json(os.path.join(workdir, "results.json"), results)
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
  for name, phase in (
    ("train_experts", train_experts),
    ("train_gate", train_gate),
    ("distill", distill_student),
    ("train_baselines", train_baselines),
    ("evaluate", evaluate_all),
  ):
    t0 = time.perf_counter()
    results = phase(config, workdir, log)
    timings[name] = round(time.perf_counter() - t0, 2)
  results["seconds"] = timings
  evaluate.write_json(os.path.join(workdir, "results.json"), results)
  return results


def _baseline(config, cache_NxTxM, d: data_lib.DomainData) -> np.ndarray:
  """b_k in nats per token (docs/math.md §3) on split `d`."""
  K = d.num_domains
  if config.baseline == "expert":
    return np.array([evaluate.domain_ce(cache_NxTxM[..., k], d)[k] for k in range(K)])
  if config.baseline == "none":
    return np.zeros(K)
  if config.baseline == "entropy":
    if config.data.name != "markov":
      raise InputError(
        f"baseline 'entropy' needs known entropies: only the markov "
        f"dataset has them, not {config.data.name!r}."
      )
    return datasets.markov_entropy(datasets.make_config("markov", **dict(config.data.options)))
  raise InputError(f"unknown config.baseline {config.baseline!r}; choose expert, entropy or none.")
