"""Bootstrap intervals for held-out losses (docs/math.md §8).

A method's held-out numbers are functions of per-sequence sums: its negative
log-likelihood `nll_N` (nats, summed over a sequence's real target tokens), the
token counts `tokens_N` and the domain ids `domain_N`. A resample draws, within
each domain, as many sequences as it has, uniformly with replacement
(stratified: every domain keeps its size), and recomputes

    L_k = Σ_{i in k} nll_i / Σ_{i in k} tokens_i − b_k,   mean_k L_k,   max_{λ∈Λ} Σ_k λ_k L_k.

Intervals are percentile intervals over `num_resamples` resamples (shape names: R
resamples, S methods scored together). Every function is deterministic given its
key, and the same key draws the same resamples for any method on the same
sequences, so the intervals of several methods, and of their differences (`paired`),
come from one set of resamples.

Baselines measured on the same sequences (the "expert" baseline of §3: b_k is
domain k's expert's cross-entropy on domain k's test sequences) are random too; to
resample them with the losses, pass `nll_N − nll_of_own_expert_N` as `nll_N` and
zero baselines: L_k = Σ (nll_i − nll'_i) / Σ tokens_i is the same number.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import checks
from robust_gate.certificate import check_in_set, duality_gap
from robust_gate.uncertainty import UncertaintySet

# Resamples computed together inside the compiled loop: bounds memory to
# _RESAMPLE_BATCH × N gathered values per method.
_RESAMPLE_BATCH = 64


class Interval(NamedTuple):
  """A point estimate on the full sample and its percentile interval (numpy)."""

  point: np.ndarray
  low: np.ndarray
  high: np.ndarray

  @property
  def excludes_zero(self) -> np.ndarray:
    """Whether 0 lies outside [low, high]: for a difference, it exceeds its noise."""
    return (self.low > 0) | (self.high < 0)


class LossIntervals(NamedTuple):
  """Intervals of the numbers every evaluation reports (docs/math.md §6)."""

  domain: Interval  # L_k, arrays [K].
  mean: Interval  # the unweighted mean over domains.
  worst_case: Interval  # max_{λ∈Λ} Σ_k λ_k L_k.


class CertificateIntervals(NamedTuple):
  """Intervals of the duality-gap certificate (docs/math.md §7)."""

  upper: Interval
  lower: Interval
  gap: Interval


@functools.partial(jax.jit, static_argnames=("num_domains", "num_resamples"))
def resample_indices(
  key: jax.Array, domain_N: jax.Array, num_domains: int, num_resamples: int
) -> jax.Array:
  """The stratified resamples every function here draws from `key`, [R, N]: entry
  (r, i) is a uniform draw among the sequences of sequence i's domain."""
  draw = _draw_fn(domain_N, num_domains)
  return jax.vmap(draw)(jax.random.split(key, num_resamples))


def loss_intervals(
  key: jax.Array,
  nll_N,
  tokens_N,
  domain_N,
  baseline_K,
  uncertainty: UncertaintySet,
  *,
  num_resamples: int = 1000,
  level: float = 0.95,
) -> LossIntervals:
  """Per-domain, mean and worst-case losses of one method with their intervals.

  Args:
    key: PRNG key of the resamples.
    nll_N: per-sequence negative log-likelihood sums, nats.
    tokens_N: per-sequence token counts (> 0).
    domain_N: per-sequence domain ids in [0, K).
    baseline_K: b_k, nats per token.
    uncertainty: Λ, for the worst case.
    num_resamples: R.
    level: coverage of the percentile intervals.

  Returns:
    LossIntervals in nats per token (`objectives.nats_to_bits` converts each field).
  """
  level = _check_level(level)
  arrays = _check({"nll_N": nll_N}, tokens_N, domain_N, baseline_K, uncertainty, num_resamples)
  point, boot = _replicates(key, *arrays, uncertainty, num_resamples)
  return _loss_intervals(_method(point, 0), _method(boot, 0), level)


def paired(
  key: jax.Array,
  nll_a_N,
  nll_b_N,
  tokens_N,
  domain_N,
  baseline_K,
  uncertainty: UncertaintySet,
  *,
  num_resamples: int = 1000,
  level: float = 0.95,
) -> LossIntervals:
  """Intervals of method A's numbers minus method B's on the same sequences.

  Both are recomputed on every resample, so what the sequences share cancels: an
  interval that excludes 0 (`Interval.excludes_zero`) is a difference larger than
  the noise of the test set. The worst-case field is worst(A) − worst(B), each
  with its own maximizing λ. A method paired with itself gives exactly 0.

  Args:
    key, tokens_N, domain_N, baseline_K, uncertainty, num_resamples, level: as
      in `loss_intervals`.
    nll_a_N, nll_b_N: the two methods' per-sequence NLL sums.

  Returns:
    LossIntervals of the differences A − B, nats per token.
  """
  level = _check_level(level)
  nlls = {"nll_a_N": nll_a_N, "nll_b_N": nll_b_N}
  arrays = _check(nlls, tokens_N, domain_N, baseline_K, uncertainty, num_resamples)
  point, boot = _replicates(key, *arrays, uncertainty, num_resamples)
  diff = lambda r: tuple(a - b for a, b in zip(_method(r, 0), _method(r, 1)))
  return _loss_intervals(diff(point), diff(boot), level)


def certificate_intervals(
  key: jax.Array,
  nll_N,
  best_response_nll_N,
  tokens_N,
  domain_N,
  baseline_K,
  lam_bar_K,
  uncertainty: UncertaintySet,
  *,
  num_resamples: int = 1000,
  level: float = 0.95,
) -> CertificateIntervals:
  """The certificate `certificate.duality_gap` of a gate and a best response to λ̄,
  with intervals over resamples of the held-out sequences both are scored on.

  Args:
    key, tokens_N, domain_N, baseline_K, uncertainty, num_resamples, level: as
      in `loss_intervals`.
    nll_N: the reported gate's per-sequence NLL sums.
    best_response_nll_N: those of the gate trained at λ fixed to λ̄.
    lam_bar_K: λ̄.

  Returns:
    CertificateIntervals, nats per token.
  """
  level = _check_level(level)
  nlls = {"nll_N": nll_N, "best_response_nll_N": best_response_nll_N}
  arrays = _check(nlls, tokens_N, domain_N, baseline_K, uncertainty, num_resamples)
  lam_bar = jnp.asarray(check_in_set(lam_bar_K, uncertainty, "lam_bar_K"), jnp.float32)
  (point_SxK, _, _), (boot_SxRxK, _, _) = _replicates(key, *arrays, uncertainty, num_resamples)
  point_values = [x[0] for x in _certificate_values(point_SxK[None], lam_bar, uncertainty)]
  boot_values = _certificate_values(jnp.moveaxis(boot_SxRxK, 0, 1), lam_bar, uncertainty)
  return CertificateIntervals(*(_interval(p, b, level) for p, b in zip(point_values, boot_values)))


def _draw_fn(domain_N: jax.Array, num_domains: int):
  """draw(key) -> idx_N: one stratified resample (each domain keeps its size)."""
  N = domain_N.shape[0]
  order_N = jnp.argsort(domain_N, stable=True)  # each domain's sequences, contiguous
  count_K = jnp.zeros(num_domains, jnp.int32).at[domain_N].add(1)
  start_K = jnp.cumsum(count_K) - count_K
  start_N, count_N = start_K[domain_N], count_K[domain_N]

  def draw(key):
    # floor(u·n) is uniform on {0 … n−1}; the min guards float32 rounding u·n up to n.
    offset_N = jnp.floor(jax.random.uniform(key, (N,)) * count_N).astype(jnp.int32)
    return order_N[start_N + jnp.minimum(offset_N, count_N - 1)]

  return draw


@functools.partial(jax.jit, static_argnames=("num_resamples",))
def _replicates(key, nll_SxN, tokens_N, domain_N, baseline_K, uncertainty, num_resamples: int):
  """(L_k [S, K], mean [S], worst case [S]) of S methods on the sample, and the same
  with an axis R after S ([S, R, K], [S, R], [S, R]) on the resamples of
  `resample_indices(key, …)`."""
  K = uncertainty.num_domains
  onehot_NxK = jax.nn.one_hot(domain_N, K, dtype=jnp.float32)
  # A dot, not a scatter-add: deterministic on every backend, so equal inputs give
  # bitwise equal losses (a method minus itself is exactly 0).
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  worst = jax.vmap(lambda c_K: uncertainty.max_linear(c_K)[0])

  def reports(idx_N):
    tokens_K = dot(tokens_N[idx_N], onehot_NxK)
    losses_SxK = dot(nll_SxN[:, idx_N], onehot_NxK) / tokens_K[None, :] - baseline_K[None, :]
    return losses_SxK, jnp.mean(losses_SxK, axis=1), worst(losses_SxK)

  draw = _draw_fn(domain_N, K)
  keys = jax.random.split(key, num_resamples)
  boot = jax.lax.map(lambda k: reports(draw(k)), keys, batch_size=_RESAMPLE_BATCH)
  boot = tuple(jnp.moveaxis(x, 0, 1) for x in boot)
  return reports(jnp.arange(domain_N.shape[0])), boot


@jax.jit
def _certificate_values(losses_Rx2xK, lam_bar_K, uncertainty: UncertaintySet):
  """(upper, lower, gap), each [R], of the gate (row 0) and its best response (row 1)."""

  def values(losses_2xK):
    c = duality_gap(losses_2xK[0], losses_2xK[1], lam_bar_K, uncertainty)
    return c.upper, c.lower, c.gap

  return jax.vmap(values)(losses_Rx2xK)


def _method(reports, s: int):
  """Method s's (L_k, mean, worst case), as numpy, from `_replicates`."""
  return tuple(np.asarray(x[s]) for x in reports)


def _interval(point, boot_R, level: float) -> Interval:
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(np.asarray(boot_R), [tail, 1.0 - tail], axis=0)
  return Interval(np.asarray(point), low, high)


def _loss_intervals(point, boot, level: float) -> LossIntervals:
  return LossIntervals(*(_interval(p, b, level) for p, b in zip(point, boot)))


def _check(nlls: dict, tokens_N, domain_N, baseline_K, uncertainty, num_resamples):
  """Validated device arrays (nll_SxN, tokens_N, domain_N, baseline_K); raises InputError."""
  K = uncertainty.num_domains
  nll_list = [checks.as_float_array(v, name, 1) for name, v in nlls.items()]
  tokens = checks.as_float_array(tokens_N, "tokens_N", 1)
  domain = np.asarray(domain_N)
  baseline = checks.as_float_array(baseline_K, "baseline_K", 1)
  sizes = [x.shape for x in (*nll_list, tokens, domain)]
  if len(set(sizes)) > 1:
    raise checks.InputError(
      f"{', '.join(nlls)}, tokens_N and domain_N must have one entry per sequence; got "
      f"shapes {', '.join(map(str, sizes))}."
    )
  nll_SxN = np.stack(nll_list)
  if baseline.shape != (K,):
    raise checks.InputError(f"baseline_K has shape {baseline.shape} but Λ is over {K} domains.")
  if not (np.all(np.isfinite(nll_SxN)) and np.all(np.isfinite(baseline))):
    raise checks.InputError(f"{', '.join(nlls)} and baseline_K must be finite.")
  if np.any(tokens <= 0):
    raise checks.InputError(f"tokens_N must be positive; sequence {np.argmin(tokens)} has 0.")
  if not np.issubdtype(domain.dtype, np.integer) or np.any((domain < 0) | (domain >= K)):
    raise checks.InputError(f"domain_N must hold integer domain ids in [0, {K}).")
  empty = np.flatnonzero(np.bincount(domain, minlength=K) == 0)
  if empty.size:
    raise checks.InputError(f"domain {empty[0]} has no sequences: its loss is undefined.")
  if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
    raise checks.InputError(f"num_resamples must be a positive int, got {num_resamples!r}.")
  return (
    jnp.asarray(nll_SxN, jnp.float32),
    jnp.asarray(tokens, jnp.float32),
    jnp.asarray(domain, jnp.int32),
    jnp.asarray(baseline, jnp.float32),
  )


def _check_level(level: float) -> float:
  if not 0.0 < level < 1.0:
    raise checks.InputError(f"level must be in (0, 1), got {level}.")
  return level
