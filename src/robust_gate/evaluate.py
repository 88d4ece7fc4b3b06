"""Evaluation: held-out losses of every method with their error bars, the robust gate's
certificate, gate usage and gradient conflict (docs/math.md §6–§8); robust_gate.summary
prints and plots what this computes.

Losses are reported in bits per token. `domain_loss` is L_k = CE(D_k, model) − b_k
with the same baseline the game used (default: b_k = the domain's own expert's
held-out cross-entropy, so L_k is the excess over that expert); `domain_ce` is
the raw cross-entropy. The worst case is `max_{λ∈Λ} Σ_k λ_k L_k`.

Every method is scored once per test sequence (`SequenceScores`); the point estimates
and their bootstrap intervals (`robust_gate.bootstrap`, §8) are computed from those
sums. One key, from the config's seed, draws the resamples of every interval, so every
method, every paired difference and the certificate see the same resamples.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import (
  bootstrap,
  certificate,
  closures,
  experts,
  gating,
  models,
  objectives,
  parallel,
  records,
  shards,
)
from robust_gate.checks import InputError
from robust_gate.data import DomainData

# Resamples and coverage of every interval in results.json (docs/math.md §8).
RESAMPLES = 1000
LEVEL = 0.95
# What the intervals resample, as results.json states it.
RESAMPLED_OVER = "test sequences, resampled within each domain"
# The stream of config.seed the bootstrap draws from (the phases' initializations use 1–3).
_BOOTSTRAP_STREAM = 8
# The method every other is compared with, and the gate trained at λ fixed to its λ̄.
REFERENCE = "robust_gate"
BEST_RESPONSE = "best_response"


def domain_mean(values_NxT, data: DomainData) -> np.ndarray:
  """Per-token values ([N, T] or [N, T, M]) averaged over each domain's tokens
  (Σ over the domain's tokens / their number): [K] or [K, M].

  Raises InputError naming a domain with no tokens, whose mean does not exist (a
  split or subset without its examples), rather than reporting NaN for it.
  """
  return _per_domain(_sequence_sums(values_NxT, data.mask_NxT), data.mask_NxT.sum(axis=1), data)


def _sequence_sums(values_NxT, mask_NxT) -> np.ndarray:
  """Σ over each sequence's real tokens: [N] or [N, M], in the values' dtype."""
  values = np.asarray(values_NxT)
  mask = mask_NxT.reshape(mask_NxT.shape + (1,) * (values.ndim - 2))
  return np.where(mask, values, 0.0).sum(axis=1)


def _per_domain(sums_N, tokens_N, data: DomainData) -> np.ndarray:
  """Per-sequence sums ([N] or [N, M]) over each domain's tokens: [K] or [K, M]."""
  K = data.num_domains
  if sums_N.ndim == 1:
    totals = np.bincount(data.domain_N, sums_N, K)
  else:
    totals = np.stack(
      [np.bincount(data.domain_N, sums_N[:, j], K) for j in range(sums_N.shape[1])], 1
    )
  tokens = np.bincount(data.domain_N, tokens_N, K)
  for domain, n in zip(data.domains, tokens):
    if n == 0:
      raise InputError(f"domain {domain!r} has no tokens in this data: its mean is undefined.")
  return totals / tokens.reshape(tokens.shape + (1,) * (totals.ndim - 1))


def domain_ce(logp_NxT: np.ndarray, data: DomainData) -> np.ndarray:
  """Cross-entropy per domain, nats per token (Σ NLL / Σ tokens), [K]."""
  return domain_mean(-np.asarray(logp_NxT), data)


def excess_bits(ce_nats_K, baseline_nats_K) -> np.ndarray:
  """L_k = CE_k − b_k in bits per token, [K]."""
  return objectives.nats_to_bits(np.asarray(ce_nats_K) - np.asarray(baseline_nats_K))


def lm_logprobs(config: models.LMConfig, params, data: DomainData) -> np.ndarray:
  """One transformer's log-probs of the observed tokens, [N, T] (validated)."""
  model = experts.Expert(
    names=("model",),
    vocab_size=config.vocab_size,
    logprob_fn=lambda x, y: models.token_logprobs(config, params, x, y),
  )
  return experts.build_cache([model], data)[..., 0]


def gate_logprobs_and_usage(
  config: models.GateConfig, params, data: DomainData, cache_NxTxM
) -> tuple[np.ndarray, np.ndarray]:
  """The gated model's log-probs [N, T] and mean gate weights per domain [K, M]."""
  logp, gate = _gate_logprobs_and_weights(config, params, data, cache_NxTxM)
  return logp, usage(gate, data)


def _gate_logprobs_and_weights(config: models.GateConfig, params, data: DomainData, cache_NxTxM):
  """The gated model's log-probs [N, T] and its gate's weights [N, T, M]."""
  rows, n = parallel.put_rows(data.inputs_NxT, cache_NxTxM, data.mask_NxT)
  logp, gate = _gated(config, params, *rows)
  return parallel.fetch(logp)[:n], parallel.fetch(gate)[:n]


@functools.partial(jax.jit, static_argnums=0)
def _gated(config: models.GateConfig, params, inputs_NxT, cache_NxTxM, mask_NxT):
  """(log-probs, gate weights) of a gate; compiled once for every gate of one config."""
  prefix = models.prefix_loglik(cache_NxTxM, mask_NxT)
  log_gate = models.gate_log_weights(config, params, inputs_NxT, prefix)
  return gating.causal_mixture_logp(log_gate, cache_NxTxM), jnp.exp(log_gate)


def fixed_gate_logprobs(log_gate_NxTxM, cache_NxTxM) -> np.ndarray:
  return np.asarray(jax.nn.logsumexp(log_gate_NxTxM + cache_NxTxM, axis=-1))


def usage(gate_NxTxM: np.ndarray, data: DomainData) -> np.ndarray:
  """Mean gate weight of each expert over each domain's tokens, [K, M]."""
  return domain_mean(gate_NxTxM, data)


def sequence_nll(logp_NxT, data: DomainData) -> np.ndarray:
  """−Σ_t log p over each sequence's real target tokens, nats, [N] (float64)."""
  return -np.where(data.mask_NxT, np.asarray(logp_NxT), 0.0).sum(axis=1).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class SequenceScores:
  """Every method scored on the test split, one sum per sequence: what the point
  estimates and their bootstrap intervals are computed from (docs/math.md §8)."""

  nll_N: dict[str, np.ndarray]  # method: `sequence_nll`, nats
  tokens_N: np.ndarray  # real target tokens per sequence
  domain_N: np.ndarray  # domain ids in [0, K)
  domains: tuple[str, ...]
  baseline_K: np.ndarray  # b_k, nats per token (docs/math.md §3)
  # Where b_k is measured on these same sequences (the "expert" baseline: b_k is domain
  # k's expert's cross-entropy on them), each sequence's NLL under it; None for a b_k
  # that is a constant ("entropy", "none").
  baseline_nll_N: np.ndarray | None

  def domain_ce(self, name: str) -> np.ndarray:
    """Method `name`'s cross-entropy per domain, Σ NLL / Σ tokens, nats per token, [K]."""
    K = len(self.domains)
    totals_K = np.bincount(self.domain_N, self.nll_N[name], K)
    return totals_K / np.bincount(self.domain_N, self.tokens_N, K)

  def resampled(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(nll_N, b_K) the bootstrap resamples for method `name`.

    A b_k measured on the test sequences is noisy too: passing nll_N − baseline_nll_N
    with b = 0 gives the same L_k and resamples the baseline with the losses
    (docs/math.md §8).
    """
    if self.baseline_nll_N is None:
      return self.nll_N[name], self.baseline_K
    return self.nll_N[name] - self.baseline_nll_N, np.zeros_like(self.baseline_K)


def method_entry(ce_nats_K, baseline_nats_K, uncertainty, domains) -> dict:
  """The point estimates of one method: L_k and CE_k per domain, mean, worst case (bits)."""
  loss_K = excess_bits(ce_nats_K, baseline_nats_K)
  worst, _ = uncertainty.max_linear(jnp.asarray(loss_K, jnp.float32))
  return {
    "domain_loss": dict(zip(domains, map(float, loss_K))),
    "domain_ce": dict(zip(domains, map(float, objectives.nats_to_bits(np.asarray(ce_nats_K))))),
    "mean": float(loss_K.mean()),
    "worst_case": float(worst),
  }


def methods_on_test(
  m: records.TrainedModels, baseline: str, block_rows: int | None = None
) -> tuple[SequenceScores, dict[str, np.ndarray]]:
  """Every method of docs/math.md §6 scored on the test split, per sequence.

  The split is read `block_rows` sequences at a time (by default as many as hold
  shards.SHARD_BYTES of the cache), so that a cache stored in shards on disk and a split
  memory-mapped from its column files are never read whole into host memory: what is
  kept is one number per sequence and method (and M per gate). The default depends on
  the cache's shape only, so a job's numbers do not depend on its device budget.

  Args:
    m: the trained models: the gates (robust, ERM, best response to λ̄), the monolithic
      models, the student and the experts, whose cache also gives the uniform mixture
      and the posterior gate.
    baseline: config.baseline, the kind of `m.caches.test.baseline_K`.
    block_rows: sequences scored at a time; None: the default above.

  Returns:
    (SequenceScores, {gate: `usage`, [K, M]}) for the trained gates and the posterior gate.
  """
  te, cache = m.caches.test.data, m.caches.test.cache_NxTxM
  N, T, M = cache.shape
  if block_rows is not None and block_rows < 1:
    raise InputError(f"block_rows must be at least 1, got {block_rows}.")
  rows = block_rows or shards.rows_per_shard(T * M * np.dtype(np.float32).itemsize)
  nlls, sums, tokens = zip(
    *(
      _score_block(m, te.subset(slice(lo, lo + rows)), np.asarray(cache[lo : lo + rows]), baseline)
      for lo in range(0, N, rows)
    )
  )
  joined = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  nll_N, gate_sums, tokens_N = joined(nlls), joined(sums), np.concatenate(tokens)
  scores = SequenceScores(
    nll_N={k: v for k, v in nll_N.items() if k != _BASELINE},
    tokens_N=tokens_N,
    domain_N=np.asarray(te.domain_N),
    domains=tuple(te.domains),
    baseline_K=np.asarray(m.caches.test.baseline_K),
    baseline_nll_N=nll_N[_BASELINE] if baseline == "expert" else None,
  )
  return scores, {k: _per_domain(v, tokens_N, te) for k, v in gate_sums.items()}


# Where `_score_block` puts each sequence's NLL under its own domain's expert (the "expert"
# baseline's b_k, measured on these sequences).
_BASELINE = "own expert"


def _score_block(
  m: records.TrainedModels, te: DomainData, cache, baseline: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
  """One block of n test sequences: ({method: NLL [n]}, {gate: its weights summed over
  each sequence's tokens [n, M]}, real tokens per sequence [n])."""
  K = te.num_domains
  nll_N, sums = {}, {}
  for name, gate in m.gates.items():
    logp, weights = _gate_logprobs_and_weights(gate.cfg, gate.params, te, cache)
    nll_N[name], sums[name] = sequence_nll(logp, te), _sequence_sums(weights, te.mask_NxT)
  uniform = np.full(cache.shape, -np.log(K), np.float32)
  nll_N["uniform_mixture"] = sequence_nll(fixed_gate_logprobs(uniform, cache), te)
  prefix_NxTxM = models.prefix_loglik(jnp.asarray(cache), jnp.asarray(te.mask_NxT))
  posterior = np.asarray(gating.posterior_log_gate(jnp.zeros(K), prefix_NxTxM.reshape(-1, K)))
  posterior = posterior.reshape(cache.shape)
  nll_N["posterior_gate"] = sequence_nll(fixed_gate_logprobs(posterior, cache), te)
  sums["posterior_gate"] = _sequence_sums(np.exp(posterior), te.mask_NxT)
  for name in ("monolithic", "monolithic_large", "monolithic_dro"):
    mono = getattr(m.monoliths, name)
    nll_N[name] = sequence_nll(lm_logprobs(mono.lm_cfg, mono.params, te), te)
  nll_N["student"] = sequence_nll(lm_logprobs(m.student.lm_cfg, m.student.params, te), te)
  for j, d in enumerate(te.domains):
    nll_N[f"expert:{d}"] = sequence_nll(cache[..., j], te)
  if baseline == "expert":
    own_NxT = np.take_along_axis(cache, np.asarray(te.domain_N)[:, None, None], axis=-1)[..., 0]
    nll_N[_BASELINE] = sequence_nll(own_NxT, te)
  return nll_N, sums, te.mask_NxT.sum(axis=1)


def bootstrap_key(seed: int) -> jax.Array:
  """The one key every interval of an evaluation draws its resamples from."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), _BOOTSTRAP_STREAM)


def results_on_test(
  scores: SequenceScores,
  lam_bar_K,
  uncertainty,
  seed: int,
  *,
  num_resamples: int = RESAMPLES,
  level: float = LEVEL,
) -> dict:
  """results.json's held-out numbers, each with its interval (docs/math.md §6–§8).

  Args:
    scores: every method on test, with "robust_gate" and "best_response" among them.
    lam_bar_K: the robust gate's λ̄ (renormalized here; a point of Λ).
    uncertainty: Λ.
    seed: config.seed; `bootstrap_key(seed)` draws every resample.
    num_resamples, level: of every interval.

  Returns:
    {"methods": {method: `method_entry` with "intervals" and "vs_robust_gate"},
    "bootstrap": how the intervals were drawn, "certificate": {"upper", "lower", "gap"
    as [point, lo, hi], "lower_is_estimate", "lambda_bar", "lambda_worst"},
    "lambda_rank_correlation": Spearman's ρ of λ̄ with the robust gate's L_k (None
    where either is constant)}, every loss in bits per token.

  Raises:
    InputError: without the robust gate or the best response among the scores, or
      with a λ̄ outside Λ.
  """
  missing = [n for n in (REFERENCE, BEST_RESPONSE) if n not in scores.nll_N]
  if missing:
    raise InputError(f"results_on_test needs the methods {missing} among {list(scores.nll_N)}.")
  key = bootstrap_key(seed)
  lam_bar = certificate.check_in_set(lam_bar_K, uncertainty, "lam_bar_K")
  kwargs = {"num_resamples": num_resamples, "level": level}
  methods = {
    name: method_entry(scores.domain_ce(name), scores.baseline_K, uncertainty, scores.domains)
    | _interval_entry(key, scores, name, uncertainty, **kwargs)
    for name in scores.nll_N
  }
  rho = rank_correlation(lam_bar, list(methods[REFERENCE]["domain_loss"].values()))
  return {
    "methods": methods,
    "bootstrap": {
      "resamples": num_resamples,
      "level": level,
      "over": RESAMPLED_OVER,
      "seed": seed,
    },
    "certificate": _certificate_entry(key, scores, lam_bar, uncertainty, **kwargs),
    "lambda_rank_correlation": rho if math.isfinite(rho) else None,
  }


def _interval_entry(key, scores: SequenceScores, name: str, uncertainty, **kwargs) -> dict:
  """Method `name`'s intervals, and its paired difference from the robust gate, in bits.

  {"intervals": {"domain_loss": {domain: [lo, hi]}, "mean": [lo, hi], "worst_case":
  [lo, hi]}, "vs_robust_gate": {"worst_case": [point, lo, hi], "mean": [point, lo,
  hi]}}: the difference is this method's number minus the robust gate's on the same
  resamples (positive: the robust gate is better); it exceeds the test set's noise
  where its interval excludes 0. `kwargs`: num_resamples and level.
  """
  nll_N, b_K = scores.resampled(name)
  reference_N, _ = scores.resampled(REFERENCE)
  args = (scores.tokens_N, scores.domain_N, b_K, uncertainty)
  own = bootstrap.loss_intervals(key, nll_N, *args, **kwargs)
  diff = bootstrap.paired(key, nll_N, reference_N, *args, **kwargs)
  low_K, high_K = _bits(own.domain.low), _bits(own.domain.high)
  return {
    "intervals": {
      "domain_loss": {d: [lo, hi] for d, lo, hi in zip(scores.domains, low_K, high_K)},
      "mean": _bits(own.mean[1:]),
      "worst_case": _bits(own.worst_case[1:]),
    },
    "vs_robust_gate": {"worst_case": _bits(diff.worst_case), "mean": _bits(diff.mean)},
  }


def _certificate_entry(key, scores: SequenceScores, lam_bar_K, uncertainty, **kwargs) -> dict:
  """The robust gate's duality-gap certificate against the best response to λ̄
  (docs/math.md §7), each value as [point, lo, hi] in bits on the resamples of `key`.

  The lower value comes from a trained best response scored on test sequences, so it
  is an estimate (§7.1); `lower ≤ upper` on the sample and on every resample.
  `lambda_worst` is a λ attaining the upper value. `kwargs`: num_resamples and level.
  """
  nll_N, b_K = scores.resampled(REFERENCE)
  best_N, _ = scores.resampled(BEST_RESPONSE)
  found = bootstrap.certificate_intervals(
    key, nll_N, best_N, scores.tokens_N, scores.domain_N, b_K, lam_bar_K, uncertainty, **kwargs
  )
  loss_K, best_loss_K = (
    jnp.asarray(scores.domain_ce(n) - scores.baseline_K, jnp.float32)
    for n in (REFERENCE, BEST_RESPONSE)
  )
  lam_K = jnp.asarray(lam_bar_K, jnp.float32)
  point = certificate.duality_gap(loss_K, best_loss_K, lam_K, uncertainty)
  named = lambda lam_K: dict(zip(scores.domains, map(float, np.asarray(lam_K))))
  return {
    "upper": _bits(found.upper),
    "lower": _bits(found.lower),
    "gap": _bits(found.gap),
    "lower_is_estimate": point.lower_is_estimate,
    "lambda_bar": named(lam_bar_K),
    "lambda_worst": named(point.lam_worst_K),
  }


def rank_correlation(x_K, y_K) -> float:
  """Spearman's ρ: the correlation of the ranks, tied values at their average rank.

  Whether λ̄ ranks the domains as their held-out losses do. NaN where either input is
  constant (its ranks have no spread), as scipy.stats.spearmanr.
  """
  rx_K, ry_K = (_average_ranks(np.asarray(v, np.float64)) for v in (x_K, y_K))
  rx_K, ry_K = rx_K - rx_K.mean(), ry_K - ry_K.mean()
  norm = math.sqrt(float(rx_K @ rx_K) * float(ry_K @ ry_K))
  return float(rx_K @ ry_K) / norm if norm > 0 else math.nan


def _average_ranks(x_K: np.ndarray) -> np.ndarray:
  """Ranks 1…K of `x_K`; a group of c ties ending at rank e shares e − (c − 1)/2."""
  _, group_K, counts = np.unique(x_K, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return (ends - (counts - 1) / 2.0)[group_K]


def _bits(values) -> list[float]:
  """Nats per token (an Interval, or arrays) as a list of floats in bits per token."""
  return [float(v) for v in objectives.nats_to_bits(np.asarray(values, np.float64))]


def gradient_conflict(loss_fn, params, key) -> np.ndarray:
  """Cosine matrix of the per-domain gradients ∇L_k at `params` on one batch, [K, K].

  The Jacobian is one compiled program, its data passed as arguments (closures.hoist):
  run op by op, `jacrev` took about 19 s per launch on the 2-core CPU."""
  jacobian = lambda p: jax.jacrev(lambda q: loss_fn(q, None, key))(p)
  hoisted, consts = closures.hoist(jacobian, params)
  jac = _apply(hoisted, consts, params)
  flat = np.concatenate(
    [np.asarray(g).reshape(np.asarray(g).shape[0], -1) for g in jax.tree_util.tree_leaves(jac)],
    axis=1,
  )
  flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
  return flat @ flat.T


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn: closures.Hoisted, consts, *args):
  return fn(consts, *args)
