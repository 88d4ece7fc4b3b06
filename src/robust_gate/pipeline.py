"""The main job, end to end: experts → cache → gates → baselines → evaluation.

`run(config, workdir)` is what `launch/main.py` and the notebooks call:

1. load the domains (local TFDS builders, prepared once under the data dir);
2. train K experts (one per domain, stacked, one compiled program) on `train`;
3. score them once on `validation` (the gate's data) and `test`: the caches;
4. fit the robust gate (the game of MATH.md §4) and the ERM gate (λ fixed), and
   distill the robust gated model into one expert-sized student (§5);
5. train the monolithic baselines (one expert's size, all experts' size, group DRO);
6. evaluate every method of MATH.md §6 on `test`: results.json, a table, plots.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import data as data_lib
from robust_gate import datasets, distill, evaluate, experts, gating, models, train
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError


def _lm_config(c, vocab_size, max_len) -> models.LMConfig:
  return models.LMConfig(vocab_size=vocab_size, max_len=max_len, d_model=c.d_model,
                         num_layers=c.num_layers, num_heads=c.num_heads, d_ff=c.d_ff)


def _num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def check_config(config) -> None:
  """Positive sizes and step counts, finite positive learning rates, η ≥ 0."""
  for section in ("expert", "monolithic", "monolithic_large", "gate", "distill"):
    for key, value in config[section].items():
      name = f"config.{section}.{key}"
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}={value!r} must be a number.")
      if key.endswith("dual_lr") or key == "token_embed":
        ok = np.isfinite(value) and value >= 0
      else:
        ok = np.isfinite(value) and value > 0
      if not ok:
        raise InputError(f"{name}={value!r} must be finite and "
                         f"{'≥ 0' if key.endswith('dual_lr') or key == 'token_embed' else '> 0'}.")
      if key not in ("lr", "dual_lr", "dro_dual_lr") and not isinstance(value, int):
        raise InputError(f"{name}={value!r} must be an int.")


def load_splits(config, data_dir: str) -> dict:
  options = dict(config.data.options)
  return {split: data_lib.load_local(config.data.name, split, data_dir,
                                     config.data.max_len, **options)
          for split in datasets.SPLITS}


def run(config, workdir: str, log=print) -> dict:
  """Runs the main job; returns the results dict (also in workdir/results.json)."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  timings, t0 = {}, time.perf_counter()

  def lap(name):
    nonlocal t0
    timings[name] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()

  splits = load_splits(config, config.data_dir or os.path.join(workdir, "tfds"))
  tr, va, te = splits["train"], splits["validation"], splits["test"]
  domains, K, V, T = tr.domains, tr.num_domains, tr.vocab_size, config.data.max_len
  lam_set = uncertainty_lib.from_config(config, K)
  log(f"data: {config.data.name}, domains {list(domains)}, train {tr.counts().tolist()}, "
      f"validation {va.counts().tolist()}, test {te.counts().tolist()}")
  lap("data")

  # 2. Experts: K stacked models, expert k on domain k.
  ec = config.expert
  lm_cfg = _lm_config(ec, V, T)
  key = jax.random.PRNGKey(config.seed)
  step, state = train.make_game(
      train.expert_loss_fn(lm_cfg, tr, ec.per_domain),
      models.init_stacked_lm(lm_cfg, jax.random.fold_in(key, 1), K),
      num_domains=K, lr=ec.lr, dual_lr=0.0, seed=config.seed)
  state, _ = train.fit(step, state, ec.steps, name="experts", log=log)
  expert_params = state.params
  group = experts.transformer_experts(lm_cfg, expert_params, domains)
  lap("experts")

  # 3. The caches: every expert scored once per split.
  cache_va = experts.cached_scores(os.path.join(workdir, "cache_validation.npz"),
                                   [group], va)
  cache_te = experts.cached_scores(os.path.join(workdir, "cache_test.npz"), [group], te)
  lap("cache")

  baseline_va = _baseline(config, cache_va, va)
  baseline_te = _baseline(config, cache_te, te)

  # 4. Gates: robust (the game) and ERM (λ fixed), on the validation cache.
  gc = config.gate
  gate_cfg = models.GateConfig(num_experts=K, vocab_size=V, max_len=T,
                               hidden=gc.hidden, token_embed=gc.token_embed,
                               pos_embed=gc.pos_embed)
  gate_loss = train.gate_loss_fn(gate_cfg, va, cache_va, gc.per_domain,
                                 jnp.asarray(baseline_va, jnp.float32))
  gates, lam_history = {}, {}
  for name, dual_lr in (("robust_gate", gc.dual_lr), ("erm_gate", 0.0)):
    step, state = train.make_game(
        gate_loss, models.init_gate(gate_cfg, jax.random.fold_in(key, 2)),
        num_domains=K, lr=gc.lr, dual_lr=dual_lr, seed=config.seed,
        uncertainty=lam_set if dual_lr else None)  # ERM: the uniform mixture
    state, hist = train.fit(step, state, gc.steps, name=name, log=log)
    gates[name] = state
    if dual_lr:
      lam_history[name] = hist["lam"]
  lap("gates")

  # 4b. Distillation (MATH.md §5): one expert-sized student, weights λ̄, on train.
  dc = config.distill
  lam_bar = gates["robust_gate"].lam_avg_K
  student_params, init_from = distill.student_init(expert_params, lam_bar)
  step, state = train.make_game(
      distill.distill_loss_fn(lm_cfg, expert_params, gate_cfg,
                              gates["robust_gate"].params, tr, dc.per_domain),
      student_params, num_domains=K, lr=dc.lr, dual_lr=0.0, seed=config.seed,
      lam_K=lam_bar / jnp.sum(lam_bar))
  state, _ = train.fit(step, state, dc.steps, name="distill", log=log)
  student_params = state.params
  lap("distill")

  # 5. Monolithic baselines on the train split.
  mc, lc = config.monolithic, config.monolithic_large
  mono = {}
  for name, cfg, steps, lr, dual_lr in (
      ("monolithic", lm_cfg, mc.steps, mc.lr, 0.0),
      ("monolithic_dro", lm_cfg, mc.steps, mc.lr, mc.dro_dual_lr),
      ("monolithic_large", _lm_config(lc, V, T), lc.steps, lc.lr, 0.0)):
    loss_fn = train.monolithic_loss_fn(cfg, tr, mc.per_domain,
                                       jnp.asarray(baseline_va, jnp.float32))
    step, state = train.make_game(loss_fn, models.init_lm(cfg, jax.random.fold_in(key, 3)),
                                  num_domains=K, lr=lr, dual_lr=dual_lr,
                                  seed=config.seed,
                                  uncertainty=lam_set if dual_lr else None)
    state, hist = train.fit(step, state, steps, name=name, log=log)
    mono[name] = (cfg, state.params, loss_fn)
    if dual_lr:
      lam_history[name] = hist["lam"]
  lap("monolithic")

  # 6. Evaluation on test.
  methods, use = {}, {}
  entry = lambda logp: evaluate.method_entry(evaluate.domain_ce(logp, te), baseline_te,
                                             lam_set, domains)
  for name in ("robust_gate", "erm_gate"):
    logp, use[name] = evaluate.gate_logprobs_and_usage(gate_cfg, gates[name].params, te,
                                                       cache_te)
    methods[name] = entry(logp)
  uniform = np.full(cache_te.shape, -np.log(K), np.float32)
  methods["uniform_mixture"] = entry(evaluate.fixed_gate_logprobs(uniform, cache_te))
  posterior = np.asarray(gating.posterior_log_gate(
      jnp.zeros(K), models.prefix_loglik(cache_te, te.mask_NxT).reshape(-1, K)))
  posterior = posterior.reshape(cache_te.shape)
  methods["posterior_gate"] = entry(evaluate.fixed_gate_logprobs(posterior, cache_te))
  use["posterior_gate"] = evaluate.usage(np.exp(posterior), te)
  for name in ("monolithic", "monolithic_large", "monolithic_dro"):
    cfg, params, _ = mono[name]
    methods[name] = entry(evaluate.lm_logprobs(cfg, params, te))
  methods["student"] = entry(evaluate.lm_logprobs(lm_cfg, student_params, te))
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
      "lambda_bar": dict(zip(domains, map(float, gates["robust_gate"].lam_avg_K))),
      "lambda_last": dict(zip(domains, map(float, gates["robust_gate"].lam_K))),
      "methods": methods,
      "gate_usage": {k: v.tolist() for k, v in use.items()},
      "gradient_conflict": {
          "monolithic": evaluate.gradient_conflict(mono["monolithic"][2],
                                                   mono["monolithic"][1],
                                                   conflict_key).tolist(),
          "gate": evaluate.gradient_conflict(gate_loss, gates["robust_gate"].params,
                                             conflict_key).tolist()},
      "student_init": domains[init_from],
      "num_params": {"expert": _num_params(expert_params) // K,
                     "student": _num_params(student_params),
                     "gate": _num_params(gates["robust_gate"].params),
                     "monolithic": _num_params(mono["monolithic"][1]),
                     "monolithic_large": _num_params(mono["monolithic_large"][1])},
  }
  lap("evaluate")
  results["seconds"] = timings
  evaluate.write_json(os.path.join(workdir, "results.json"), results)
  evaluate.plot(results, lam_history, workdir)
  log(evaluate.format_table(results))
  return results


def _baseline(config, cache_NxTxM, d: data_lib.DomainData) -> np.ndarray:
  """b_k in nats per token (MATH.md §3) on split `d`."""
  K = d.num_domains
  if config.baseline == "expert":
    return np.array([evaluate.domain_ce(cache_NxTxM[..., k], d)[k] for k in range(K)])
  if config.baseline == "none":
    return np.zeros(K)
  if config.baseline == "entropy":
    if config.data.name != "markov":
      raise InputError(f"baseline 'entropy' needs known entropies: only the markov "
                       f"dataset has them, not {config.data.name!r}.")
    return datasets.markov_entropy(datasets.make_config("markov", **dict(
        config.data.options)))
  raise InputError(f"unknown config.baseline {config.baseline!r}; choose expert, "
                   f"entropy or none.")
