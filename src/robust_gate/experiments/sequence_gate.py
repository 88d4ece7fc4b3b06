"""Sequence-level gates on data (docs/math.md §2.2): the general G_1 object, trained by the
robust game, against the causal gate, and distilled into a causal gate (§5).

For every seed of `common.seeds`, three gates over the main job's experts:

  sequence_gate   `sequence_level.SequenceGate` (width config.gate.hidden): g_w(x, j) =
                  softmax(s_w(x))_j / Z_w from the experts' log-likelihoods of the whole
                  sequence, trained as the main job's robust gate is (validation's fit
                  part, its dual on the holdout, the config's Λ, config.gate's steps, step
                  sizes and EMA), with log Z_w estimated at every step on one fixed sample
                  of `train_samples` draws from each expert (drawn from the seed)
  causal_gate     the causal robust gate of §2.1 trained by the same game at the same seed
                  (at config.seed: the main job's own)
  distilled_gate  the causal gate network fitted to the sequence gate by cross-entropy on
                  draws from it: `distill_samples` draws of each expert (from the seed),
                  importance-resampled to p_w at every step (`distill.causal_on_samples_loss_fn`;
                  robust_gate.distill's docstring says why draws and not reweighted data),
                  config.gate.steps of Adam from the causal gate's initialization

Each is scored on test as the main job's methods are (§6, §8): L_k, mean and worst case
with percentile intervals over 1000 stratified resamples of the test sequences
(`evaluate.bootstrap_key(config.seed)`, the resamples of results.json), and its paired
difference from the causal gate of its seed. The sequence gate's loss needs log Z_w: it is
estimated on a fresh sample of `eval_samples` draws per expert, drawn once from config.seed
and independent of every fit, its Jensen bias corrected and its standard error taken by the
delta method (`gating.log_normalizer`). Its points use that log Z; the low end of each of
its intervals is the test-set interval's low end at the low end of log Z's interval, the
high end likewise, so an interval covers both sources of noise (by a union bound, at level
at least 2·level − 1). `normalizer` reports, per seed, log Ẑ on the training sample beside
the fresh one: what a loss computed with the training sample would have gained.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import (
  bootstrap,
  distill,
  evaluate,
  experts,
  gating,
  models,
  objectives,
  phases,
  sampling,
  sequence_level,
)
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.experiments import common, reporting
from robust_gate.records import Scored

METHODS = ("sequence_gate", "causal_gate", "distilled_gate")
REFERENCE = "causal_gate"  # every method's paired difference is from it
# Streams of a seed's key: the gates' initialization is phase 2's (phases); the bootstrap's is 8.
_TRAIN_SAMPLE, _EVAL_SAMPLE, _DISTILL_SAMPLE, _INIT = 21, 22, 23, 2
SEEDS_NOTE = (
  f"{common.SEEDS_NOTE}; each seed also draws the expert samples the sequence gate's "
  "normalizer is fitted with and the distillation's; the evaluation's normalizer sample is "
  "drawn once, from config.seed"
)


def _quiet(line: str) -> None:
  """Training's progress lines: the experiment logs one line per seed instead."""


def _key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def draw(m, key: jax.Array, num_per_expert: int):
  """(samples, their experts' cache [N, T, M], their features with leading axes [M, S])."""
  e = m.experts
  names = e.group.names
  samples = sampling.expert_samples(e.lm_cfg, e.params, names, key, num_per_expert)
  cache = experts.build_cache([e.group], samples)
  f = sequence_level.features(cache, samples.mask_NxT, samples.targets_NxT)
  by_expert = jax.tree_util.tree_map(
    lambda a: a.reshape(len(names), num_per_expert, *a.shape[1:]), f
  )
  return samples, cache, by_expert


def _game(t: phases.Training, lam_set, loss_fn, params, dual_loss_fn, K: int):
  """The main job's robust-gate game (phases.gate_game's) for any gate's loss function."""
  return train_lib.make_game(
    loss_fn,
    params,
    num_domains=K,
    lr=t.lr,
    dual_lr=t.dual_lr,
    seed=t.seed,
    uncertainty=lam_set if t.dual_lr else None,
    ema_decay=t.ema_decay,
    dual_loss_fn=dual_loss_fn,
    dual_timescale=t.dual_timescale,
    optimistic=t.optimistic,
  )


def train_sequence_gate(config, data: common.GateData, t, lam_set, samples, name: str):
  """The sequence gate's final GameState (reported: its EMA) and its config."""
  K = data.fit.data.num_domains
  cfg = sequence_level.SequenceGateConfig(K, config.data.max_len, config.gate.hidden)

  def loss_fn(on: Scored):
    return sequence_level.loss_fn(
      cfg, on.data, on.cache_NxTxM, on.baseline_K, samples, t.per_domain
    )

  dual = None if data.dual is None else loss_fn(data.dual)
  dual_loss_fn = None if dual is None else (lambda p, key: dual(p, None, key))
  params = sequence_level.init_gate(cfg, _key(t.seed, _INIT))
  step, state = _game(t, lam_set, loss_fn(data.fit), params, dual_loss_fn, K)
  state, _ = train_lib.fit(
    step, state, t.steps, name=name, log=_quiet, chunk=config.checkpoint_every
  )
  return cfg, state


def train_causal_gate(config, cfg: models.GateConfig, data: common.GateData, t, lam_set, name):
  """The causal robust gate of the main job's game at `t.seed`; its final GameState."""
  uncertainty = lam_set if t.dual_lr else None
  step, state, _ = phases.gate_game(cfg, data.fit, t, uncertainty, dual_on=data.dual)
  return train_lib.fit(step, state, t.steps, name=name, log=_quiet, chunk=config.checkpoint_every)[
    0
  ]


def distill_gate(config, cfg: models.GateConfig, t, samples, cache, log_w_N, name: str):
  """A causal gate (from the causal gate's initialization) fitted to draws from p_w; its
  reported parameters (the EMA, as every gate's)."""
  K = len(samples.domains)
  loss_fn = distill.causal_on_samples_loss_fn(cfg, samples, cache, log_w_N, t.per_domain * K)
  params = models.init_gate(cfg, _key(t.seed, _INIT))
  step, state = train_lib.make_game(
    loss_fn, params, num_domains=1, lr=t.lr, dual_lr=0.0, seed=t.seed, ema_decay=t.ema_decay
  )
  state, _ = train_lib.fit(
    step, state, t.steps, name=name, log=_quiet, chunk=config.checkpoint_every
  )
  return state.ema_params


def held_out(
  scores: evaluate.SequenceScores, name: str, key, lam_set, shift=(0.0, 0.0)
) -> dict[str, Any]:
  """Method `name`'s test numbers in bits per token, as results.json has them (§6): points,
  "intervals", and its paired difference from REFERENCE, `vs_causal_gate` [point, lo, hi].

  `shift`: nats per sequence added to its NLLs for the low and for the high end of every
  interval (log Z's interval about its point, for the sequence gate; 0 otherwise).
  """
  entry = evaluate.method_entry(scores.domain_ce(name), scores.baseline_K, lam_set, scores.domains)
  reference = evaluate.method_entry(
    scores.domain_ce(REFERENCE), scores.baseline_K, lam_set, scores.domains
  )
  nll_N, b_K = scores.resampled(name)
  reference_N, _ = scores.resampled(REFERENCE)
  args = (scores.tokens_N, scores.domain_N, b_K, lam_set)
  low, high = (bootstrap.loss_intervals(key, nll_N + s, *args) for s in shift)
  diff_low, diff_high = (bootstrap.paired(key, nll_N + s, reference_N, *args) for s in shift)
  bits = lambda x: float(objectives.nats_to_bits(x))
  entry["intervals"] = {
    "domain_loss": {
      d: [bits(lo), bits(hi)] for d, lo, hi in zip(scores.domains, low.domain.low, high.domain.high)
    },
    **{f: [bits(getattr(low, f).low), bits(getattr(high, f).high)] for f in ("mean", "worst_case")},
  }
  entry[f"vs_{REFERENCE}"] = {
    f: [entry[f] - reference[f], bits(getattr(diff_low, f).low), bits(getattr(diff_high, f).high)]
    for f in ("mean", "worst_case")
  }
  return entry


def sequence_scores(m, nll_N: dict[str, np.ndarray], baseline: str) -> evaluate.SequenceScores:
  """The methods' test NLLs as the evaluation scores them (its b_k, resampled with the
  losses where b_k is measured on the test sequences: the "expert" baseline, §8)."""
  te = m.caches.test
  own_NxT = np.take_along_axis(te.cache_NxTxM, te.data.domain_N[:, None, None], axis=-1)[..., 0]
  return evaluate.SequenceScores(
    nll_N=nll_N,
    tokens_N=te.data.mask_NxT.sum(axis=1),
    domain_N=te.data.domain_N,
    domains=tuple(te.data.domains),
    baseline_K=np.asarray(te.baseline_K),
    baseline_nll_N=evaluate.sequence_nll(own_NxT, te.data) if baseline == "expert" else None,
  )


def one_seed(config, m, seed: int, lam_set, eval_sample, sizes: dict[str, int], log) -> dict:
  """The three gates of one seed, trained and scored on test (see the module docstring)."""
  data, te = common.gate_data(m.caches), m.caches.test
  t = common.gate_training(config, seed)
  train_f = draw(m, _key(seed, _TRAIN_SAMPLE), sizes["train_samples"])[2]
  seq_cfg, seq_state = train_sequence_gate(
    config, data, t, lam_set, train_f, f"sequence gate seed={seed}"
  )
  params = seq_state.ema_params
  z_eval = sequence_level.normalizer(seq_cfg, params, eval_sample)
  log_z = gating.log_normalizer(z_eval)
  log_z_train = float(sequence_level.normalizer(seq_cfg, params, train_f).log_z)
  test_f = sequence_level.features(te.cache_NxTxM, te.data.mask_NxT, te.data.targets_NxT)
  logp_N = sequence_level.sequence_logp(seq_cfg, params, test_f, jnp.float32(log_z.log_z))
  nll_N = {"sequence_gate": -np.asarray(logp_N, np.float64)}

  causal_cfg = m.gates.robust_gate.cfg
  causal = train_causal_gate(config, causal_cfg, data, t, lam_set, f"causal gate seed={seed}")
  samples, cache, by_expert = draw(m, _key(seed, _DISTILL_SAMPLE), sizes["distill_samples"])
  pooled = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), by_expert)
  log_gate = sequence_level.log_weights(seq_cfg, params, pooled)
  log_w_N = distill.importance_log_weights(log_gate, pooled.loglik_NxM)
  name = f"distilled gate seed={seed}"
  distilled = distill_gate(config, causal_cfg, t, samples, cache, log_w_N, name)
  for n, p in (("causal_gate", causal.ema_params), ("distilled_gate", distilled)):
    logp_NxT, _ = evaluate.gate_logprobs_and_usage(causal_cfg, p, te.data, te.cache_NxTxM)
    nll_N[n] = evaluate.sequence_nll(logp_NxT, te.data)

  scores = sequence_scores(m, nll_N, config.baseline)
  key = evaluate.bootstrap_key(config.seed)
  shift = (log_z.low - log_z.log_z, log_z.high - log_z.log_z)
  tokens = float(np.mean(scores.tokens_N))
  lam_bar = lambda s: (np.asarray(s.lam_avg_K) / np.sum(s.lam_avg_K)).tolist()
  methods = {
    n: held_out(scores, n, key, lam_set, shift if n == "sequence_gate" else (0.0, 0.0))
    for n in METHODS
  }
  log(
    f"sequence_gate seed={seed}: test worst case "
    + ", ".join(f"{n} {methods[n]['worst_case']:.4f}" for n in METHODS)
    + f"; log Z {log_z.log_z:.4f} ± {log_z.stderr:.4f} (training sample {log_z_train:.4f})"
  )
  return {
    "methods": methods,
    "lambda_bar": {"sequence_gate": lam_bar(seq_state), "causal_gate": lam_bar(causal)},
    "normalizer": {
      **log_z._asdict(),
      "log_z_training_sample": log_z_train,
      # > 0: a loss with the training sample's Ẑ would look better by this much.
      "training_sample_optimism_bits_per_token": float(
        objectives.nats_to_bits((log_z.log_z - log_z_train) / tokens)
      ),
      "eval_samples_not_ended": float(np.mean(~np.asarray(eval_sample.complete_N))),
    },
    # Of the pooled draws, how many independent draws of p_w the weights are worth.
    "distillation": {"effective_fraction": distill.effective_sample_size(log_w_N) / len(log_w_N)},
  }


def run(
  config,
  workdir: str,
  log=print,
  train_samples: int = 1000,
  eval_samples: int = 4000,
  distill_samples: int = 2000,
) -> dict:
  """The three gates over every seed, scored on test; sample sizes are draws per expert."""
  _, m = common.load(config, workdir)
  domains = tuple(m.caches.test.data.domains)
  lam_set = uncertainty_lib.from_config(config, len(domains))
  sizes = {
    "train_samples": train_samples,
    "eval_samples": eval_samples,
    "distill_samples": distill_samples,
  }
  eval_sample = draw(m, _key(config.seed, _EVAL_SAMPLE), eval_samples)[2]
  out: dict[str, Any] = {
    **common.seeded(config, SEEDS_NOTE),
    "units": "bits/token",
    "uncertainty": lam_set.kind,
    "samples_per_expert": sizes,
    "reference": REFERENCE,
  }
  runs = [one_seed(config, m, seed, lam_set, eval_sample, sizes, log) for seed in out["seeds"]]
  out["summary"] = {
    n: common.across_seeds(
      [
        {
          "worst_case": r["methods"][n]["worst_case"],
          "mean": r["methods"][n]["mean"],
          **{f"L_{d}": r["methods"][n]["domain_loss"][d] for d in domains},
          **(
            {}
            if n == REFERENCE
            else {"worst_case_minus_causal": r["methods"][n]["vs_causal_gate"]["worst_case"][0]}
          ),
        }
        for r in runs
      ]
    )
    for n in METHODS
  }
  keep = ("log_z", "stderr", "log_z_training_sample", "training_sample_optimism_bits_per_token")
  out["normalizer"] = common.across_seeds([{k: r["normalizer"][k] for k in keep} for r in runs])
  out["distillation"] = common.across_seeds([r["distillation"] for r in runs])
  out["per_seed"] = [{"seed": seed, **r} for seed, r in zip(out["seeds"], runs)]
  cols = ("worst_case", "mean", *(f"L_{d}" for d in domains))
  rows = [(n, [reporting.pm(out["summary"][n][c]) for c in cols]) for n in METHODS]
  log(
    f"sequence_gate (test, bits/token, mean ± sd over {len(out['seeds'])} seeds; log Z of the "
    f"sequence gate {reporting.pm(out['normalizer']['log_z'])} on a fresh sample):\n"
    + reporting.table(rows, ["worst", "mean", *domains])
  )
  return reporting.write(config, workdir, "sequence_gate", out, figure(out, domains))


def figure(out: dict[str, Any], domains: tuple[str, ...]):
  """Per-domain and worst-case test losses, mean ± sd over seeds (left); each seed's worst
  case minus its causal gate's with the paired 95% interval (right; the sequence gate's
  also covers its normalizer's noise)."""
  fig, axes = reporting.plt().subplots(1, 2, figsize=(12, 4.2))
  cols = [*(f"L_{d}" for d in domains), "worst_case"]
  width = 0.8 / len(METHODS)
  for i, n in enumerate(METHODS):
    s = out["summary"][n]
    axes[0].bar(
      np.arange(len(cols)) + i * width,
      [s[c]["mean"] for c in cols],
      width,
      yerr=[s[c]["sd"] for c in cols],
      capsize=3,
      label=n,
      color=f"C{i}",
    )
    if n == REFERENCE:
      continue
    diff = np.asarray([r["methods"][n][f"vs_{REFERENCE}"]["worst_case"] for r in out["per_seed"]])
    # A percentile interval of a worst case need not hold its point (§8): no negative bars.
    bars = [np.maximum(diff[:, 0] - diff[:, 1], 0), np.maximum(diff[:, 2] - diff[:, 0], 0)]
    x = np.arange(len(diff)) + i * width
    axes[1].errorbar(x, diff[:, 0], yerr=bars, fmt="o", capsize=3, color=f"C{i}", label=n)
  axes[0].set_xticks(np.arange(len(cols)) + width, [*domains, "worst case"], fontsize=7)
  axes[0].set(ylabel="test L_k (bits/token)", title="mean ± sd over seeds")
  axes[1].axhline(0, color="k", lw=0.5)
  axes[1].set_xticks(np.arange(len(out["seeds"])) + width, [str(s) for s in out["seeds"]])
  axes[1].set(
    xlabel="seed",
    ylabel=f"worst case − {REFERENCE}'s (bits/token)",
    title="paired with the causal gate on test, 95% intervals",
  )
  for ax in axes:
    ax.legend(fontsize=7)
  return fig
