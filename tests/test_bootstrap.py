import jax
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import bootstrap, certificate, uncertainty
from robust_gate.checks import InputError

KEY = jax.random.PRNGKey(0)
BOX = uncertainty.box([0.1, 0.1, 0.1], [0.6, 0.6, 0.6])
# Most tests share N and R, so that they share one compiled program.
N, R = 300, 256


def _sample(seed, N, K=3):
  """Sequences of 5–30 tokens, domain k costing about 1 + 0.3 k nats per token."""
  rng = np.random.default_rng(seed)
  domain = rng.integers(0, K, N)
  tokens = rng.integers(5, 31, N)
  nll = tokens * (1.0 + 0.3 * domain) + rng.normal(0.0, 3.0, N) * np.sqrt(tokens)
  return nll, tokens, domain


def _fields(result):
  return {name: getattr(result, name) for name in result._fields}


def test_intervals_cover_the_point_estimates():
  nll, tokens, domain = _sample(0, N)
  baseline = np.array([0.9, 1.2, 1.5])
  r = bootstrap.loss_intervals(KEY, nll, tokens, domain, baseline, BOX, num_resamples=R)
  totals = np.bincount(domain, nll, 3) / np.bincount(domain, tokens, 3) - baseline
  np.testing.assert_allclose(r.domain.point, totals, rtol=F32_RTOL, atol=1e-6)
  np.testing.assert_allclose(r.mean.point, totals.mean(), rtol=F32_RTOL, atol=1e-6)
  np.testing.assert_allclose(
    r.worst_case.point, np.max(BOX.vertices() @ totals), rtol=F32_RTOL, atol=1e-6
  )
  for name, interval in _fields(r).items():
    assert np.all(interval.low < interval.point) and np.all(interval.point < interval.high), name


def test_width_shrinks_like_one_over_sqrt_n():
  """16 times the sequences: intervals 4 times narrower (fixed seeds, generous bounds)."""
  widths = []
  for seed, size in ((1, 500), (2, 8000)):
    r = bootstrap.loss_intervals(KEY, *_sample(seed, size), np.zeros(3), BOX, num_resamples=1024)
    widths.append([r.domain.high - r.domain.low, r.mean.high - r.mean.low])
  for small, large in zip(*widths):
    ratio = small / large
    assert np.all((ratio > 3.2) & (ratio < 5.0)), ratio


def test_a_method_paired_with_itself_differs_by_exactly_zero():
  nll, tokens, domain = _sample(3, N)
  for lam_set in (BOX, uncertainty.kl_ball([0.2, 0.3, 0.5], 0.2)):
    d = bootstrap.paired(KEY, nll, nll, tokens, domain, np.ones(3), lam_set, num_resamples=R)
    for name, interval in _fields(d).items():
      for value in interval:
        np.testing.assert_array_equal(value, 0.0, err_msg=name)


def test_paired_difference_sees_a_shift_on_one_domain():
  nll, tokens, domain = _sample(4, N)
  worse = nll + 0.05 * tokens * (domain == 0)  # 0.05 nats per token worse on domain 0
  d = bootstrap.paired(KEY, worse, nll, tokens, domain, np.zeros(3), BOX, num_resamples=R)
  for bound in d.domain:
    np.testing.assert_allclose(bound, [0.05, 0.0, 0.0], atol=1e-5)
  assert d.domain.excludes_zero.tolist() == [True, False, False]
  assert d.mean.excludes_zero


def test_matches_a_numpy_loop():
  nll, tokens, domain = _sample(5, 30)
  baseline = np.array([0.5, 0.0, -0.5])
  r = bootstrap.loss_intervals(KEY, nll, tokens, domain, baseline, BOX, num_resamples=64, level=0.9)
  idx = np.asarray(bootstrap.resample_indices(KEY, domain, 3, 64))
  stats = {"domain": [], "mean": [], "worst_case": []}
  for row in idx:
    loss = np.zeros(3)
    for k in range(3):
      mine = row[domain == k]
      loss[k] = nll[mine].sum() / tokens[mine].sum() - baseline[k]
    stats["domain"].append(loss)
    stats["mean"].append(loss.mean())
    stats["worst_case"].append(np.max(BOX.vertices() @ loss))
  for name, values in stats.items():
    low, high = np.percentile(np.array(values), [5, 95], axis=0)
    np.testing.assert_allclose(getattr(r, name).low, low, rtol=F32_RTOL, atol=1e-6)
    np.testing.assert_allclose(getattr(r, name).high, high, rtol=F32_RTOL, atol=1e-6)


def test_resamples_are_stratified_and_fixed_by_the_key():
  domain = np.repeat(np.arange(3), [2, 5, 13])[np.random.default_rng(6).permutation(20)]
  idx = np.asarray(bootstrap.resample_indices(KEY, domain, 3, 400))
  assert idx.shape == (400, 20)
  np.testing.assert_array_equal(domain[idx], np.broadcast_to(domain, idx.shape))
  for i in range(20):  # every sequence of a domain is drawn at each of its positions
    assert set(idx[:, i]) == set(np.flatnonzero(domain == domain[i]))
  np.testing.assert_array_equal(idx, bootstrap.resample_indices(KEY, domain, 3, 400))
  other = bootstrap.resample_indices(jax.random.PRNGKey(1), domain, 3, 400)
  assert not np.array_equal(idx, other)


def test_certificate_intervals():
  nll, tokens, domain = _sample(7, N)
  best = nll - 0.02 * tokens
  lam_bar = np.array([0.2, 0.3, 0.5])
  c = bootstrap.certificate_intervals(
    KEY, nll, best, tokens, domain, np.zeros(3), lam_bar, BOX, num_resamples=R
  )
  losses = [np.bincount(domain, x, 3) / np.bincount(domain, tokens, 3) for x in (nll, best)]
  point = certificate.duality_gap(*losses, lam_bar, BOX)
  for name in ("upper", "lower", "gap"):
    interval = getattr(c, name)
    np.testing.assert_allclose(interval.point, getattr(point, name), rtol=F32_RTOL, atol=1e-6)
    assert interval.low < interval.point < interval.high, name
  # The best response is 0.02 nats per token better everywhere, exactly.
  np.testing.assert_allclose(c.gap.low - c.upper.low + c.lower.low, 0.0, atol=0.02)
  assert c.gap.low > 0.0


GOOD = _sample(8, 12)


@pytest.mark.parametrize(
  "args, kwargs, match",
  [
    ((GOOD[0][:5], *GOOD[1:]), {}, r"^nll_N, tokens_N and domain_N .* shapes \(5,\), \(12,\)"),
    ((GOOD[0], GOOD[1] * 0, GOOD[2]), {}, r"^tokens_N must be positive"),
    ((GOOD[0], GOOD[1], GOOD[2] + 3), {}, r"^domain_N must hold integer domain ids in \[0, 3\)"),
    ((GOOD[0], GOOD[1], GOOD[2] * 0), {}, r"^domain 1 has no sequences"),
    ((GOOD[0] * np.nan, *GOOD[1:]), {}, r"^nll_N and baseline_K must be finite\.$"),
    (GOOD, {"num_resamples": 0}, r"^num_resamples must be a positive int, got 0\.$"),
    (GOOD, {"level": 1.0}, r"^level must be in \(0, 1\), got 1\.0\.$"),
  ],
)
def test_bad_input_is_a_clear_error(args, kwargs, match):
  with pytest.raises(InputError, match=match):
    bootstrap.loss_intervals(KEY, *args, np.zeros(3), BOX, **kwargs)
  with pytest.raises(InputError, match=r"^baseline_K has shape \(2,\) but Λ is over 3 domains"):
    bootstrap.loss_intervals(KEY, *GOOD, np.zeros(2), BOX)
