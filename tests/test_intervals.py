"""results.json's intervals, paired differences, certificate and rank correlation
(evaluate.results_on_test, docs/math.md §6–§8), on per-sequence scores built by hand."""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats
from tolerances import F32_RTOL

from robust_gate import bootstrap, evaluate, uncertainty
from robust_gate.checks import InputError

DOMAINS = ("a", "b", "c")
K = len(DOMAINS)
SIMPLEX = uncertainty.simplex(K)
LAM_BAR = np.array([0.2, 0.5, 0.3])
# Few resamples keep the tests fast; every call shares one compiled program per shape.
R = 200
LN2 = math.log(2.0)


def _scores(expert_baseline: bool, seed: int = 0, per_domain: int = 30):
  """Per-sequence NLL sums of a few methods on 3 domains; "b" is the robust gate's worst."""
  rng = np.random.default_rng(seed)
  domain_N = np.repeat(np.arange(K), per_domain)
  tokens_N = rng.integers(5, 21, domain_N.size)

  def nll(per_token_K):
    noise_N = rng.normal(0.0, 0.5, domain_N.size) * np.sqrt(tokens_N)
    return tokens_N * np.asarray(per_token_K)[domain_N] + noise_N

  own_N = nll([1.0, 1.5, 2.0])  # each sequence's own domain expert
  robust_N = own_N + tokens_N * np.array([0.05, 0.2, 0.1])[domain_N]
  nll_N = {
    "robust_gate": robust_N,
    "erm_gate": nll([1.05, 1.9, 2.1]),
    "best_response": robust_N - 0.02 * tokens_N,
    "shifted": robust_N + 0.05 * tokens_N,  # 0.05 nats per token worse everywhere
  }
  for k, d in enumerate(DOMAINS):
    nll_N[f"expert:{d}"] = np.where(domain_N == k, own_N, nll([3.0, 3.0, 3.0]))
  if expert_baseline:
    baseline_K = np.bincount(domain_N, own_N, K) / np.bincount(domain_N, tokens_N, K)
  else:
    baseline_K = np.array([1.0, 1.5, 2.0])
  return evaluate.SequenceScores(
    nll_N=nll_N,
    tokens_N=tokens_N,
    domain_N=domain_N,
    domains=DOMAINS,
    baseline_K=baseline_K,
    baseline_nll_N=own_N if expert_baseline else None,
  )


def _results(scores, lam_bar=LAM_BAR, lam_set=SIMPLEX, seed=0):
  return evaluate.results_on_test(scores, lam_bar, lam_set, seed, num_resamples=R)


@pytest.fixture(scope="module", params=[True, False], ids=["expert_baseline", "fixed_baseline"])
def results(request):
  return _results(_scores(request.param))


def test_every_method_has_intervals_around_its_point_estimates(results):
  assert list(results["methods"]) == [
    "robust_gate",
    "erm_gate",
    "best_response",
    "shifted",
    *(f"expert:{d}" for d in DOMAINS),
  ]
  for name, m in results["methods"].items():
    assert set(m) == {
      "domain_loss",
      "domain_ce",
      "mean",
      "worst_case",
      "intervals",
      "vs_robust_gate",
    }
    iv = m["intervals"]
    assert set(iv) == {"domain_loss", "mean", "worst_case"} and list(iv["domain_loss"]) == [
      *DOMAINS
    ]
    pairs = [(m["domain_loss"][d], iv["domain_loss"][d]) for d in DOMAINS]
    pairs += [(m["mean"], iv["mean"]), (m["worst_case"], iv["worst_case"])]
    for point, (low, high) in pairs:
      # Float32 bounds around float64 points: equal up to rounding where the interval
      # is a single value (an expert on its own domain, under the expert baseline).
      tol = F32_RTOL * abs(point) + 1e-7
      assert low - tol <= point <= high + tol, (name, point, low, high)
    for key in ("worst_case", "mean"):
      point, low, high = m["vs_robust_gate"][key]
      assert low <= point <= high or math.isclose(low, high, rel_tol=F32_RTOL), (name, key)
  assert results["bootstrap"] == {
    "resamples": R,
    "level": 0.95,
    "over": "test sequences, resampled within each domain",
    "seed": 0,
  }
  json.dumps(results, allow_nan=False)  # results.json is strict JSON


def test_the_robust_gate_paired_with_itself_is_exactly_zero(results):
  assert results["methods"]["robust_gate"]["vs_robust_gate"] == {
    "worst_case": [0.0, 0.0, 0.0],
    "mean": [0.0, 0.0, 0.0],
  }


def test_a_method_worse_everywhere_by_a_constant_exceeds_its_noise_by_that_constant(results):
  """0.05 nats per token more on every sequence: every resample's difference is 0.05."""
  diff = results["methods"]["shifted"]["vs_robust_gate"]
  for key in ("worst_case", "mean"):
    np.testing.assert_allclose(diff[key], [0.05 / LN2] * 3, rtol=1e-4, err_msg=key)
    assert diff[key][1] > 0  # excludes 0: the robust gate is better
  erm = results["methods"]["erm_gate"]["vs_robust_gate"]["worst_case"]
  assert erm[1] <= erm[0] <= erm[2] and erm[2] - erm[1] > 1e-3  # a noisy difference


def test_the_expert_baseline_is_resampled_with_the_sequences():
  """The robust gate is its domain's expert plus exactly 0.05, 0.2, 0.1 nats per token:
  with b_k resampled with the sequences its L_k is that on every resample; an expert's
  own domain is exactly 0."""
  r = _results(_scores(expert_baseline=True))
  iv = r["methods"]["robust_gate"]["intervals"]["domain_loss"]
  for d, excess in zip(DOMAINS, (0.05, 0.2, 0.1)):
    np.testing.assert_allclose(iv[d], [excess / LN2] * 2, rtol=1e-4, err_msg=d)
  for d in DOMAINS:
    assert r["methods"][f"expert:{d}"]["domain_loss"][d] == 0.0
    assert r["methods"][f"expert:{d}"]["intervals"]["domain_loss"][d] == [0.0, 0.0]
  # A fixed b_k leaves the noise of the robust gate's own sequences in the interval.
  fixed = _results(_scores(expert_baseline=False))
  low, high = fixed["methods"]["robust_gate"]["intervals"]["domain_loss"]["b"]
  assert high - low > 0.01


def test_the_point_estimates_are_the_bootstraps_on_the_full_sample():
  scores = _scores(expert_baseline=True)
  r = _results(scores)
  key = evaluate.bootstrap_key(0)
  for name in ("robust_gate", "erm_gate"):
    nll_N, b_K = scores.resampled(name)
    args = (nll_N, scores.tokens_N, scores.domain_N, b_K, SIMPLEX)
    found = bootstrap.loss_intervals(key, *args, num_resamples=R)
    m = r["methods"][name]
    np.testing.assert_allclose(
      list(m["domain_loss"].values()), found.domain.point / LN2, rtol=F32_RTOL
    )
    bounds = np.array(found.worst_case[1:]) / LN2
    np.testing.assert_allclose(m["intervals"]["worst_case"], bounds, rtol=F32_RTOL)


@pytest.mark.parametrize("better", [True, False], ids=["better_response", "worse_response"])
def test_certificate_lower_never_exceeds_upper(better):
  scores = _scores(expert_baseline=True)
  if not better:  # a best-response fit worse than the robust gate: ℓ falls back on it
    scores.nll_N["best_response"] = scores.nll_N["robust_gate"] + 0.1 * scores.tokens_N
  c = _results(scores)["certificate"]
  assert c["lower_is_estimate"] is True
  for i in range(3):  # the point and each bound
    assert c["lower"][i] <= c["upper"][i]
    assert c["gap"][i] >= 0.0
  upper, lower, gap = (c[k][0] for k in ("upper", "lower", "gap"))
  np.testing.assert_allclose(gap, upper - lower, rtol=F32_RTOL, atol=1e-7)
  robust = _results(scores)["methods"]["robust_gate"]
  np.testing.assert_allclose(upper, robust["worst_case"], rtol=F32_RTOL)
  loss_K = np.array(list(robust["domain_loss"].values()))
  expected = LAM_BAR @ loss_K - (0.02 / LN2 if better else 0.0)
  np.testing.assert_allclose(lower, expected, rtol=1e-4)
  assert list(c["lambda_bar"]) == [*DOMAINS]
  np.testing.assert_allclose(list(c["lambda_bar"].values()), LAM_BAR, rtol=1e-6)
  assert list(c["lambda_worst"].values()) == [0.0, 1.0, 0.0]  # the simplex: domain b's vertex


def test_certificate_over_a_box_and_a_renormalized_lam_bar():
  box = uncertainty.box([0.1, 0.1, 0.1], [0.6, 0.6, 0.6])
  scores = _scores(expert_baseline=False)
  two = {n: scores.nll_N[n] for n in ("robust_gate", "best_response")}
  scores = dataclasses.replace(scores, nll_N=two)
  c = _results(scores, LAM_BAR * (1 + 1e-7), box)["certificate"]
  lam_worst = np.array(list(c["lambda_worst"].values()))
  assert box.contains(lam_worst)
  np.testing.assert_allclose(sum(c["lambda_bar"].values()), 1.0, rtol=1e-12)
  assert c["lower"][0] <= c["upper"][0]


def test_a_lam_bar_outside_the_set_is_refused():
  box = uncertainty.box([0.25, 0.25, 0.25], [0.6, 0.6, 0.6])
  with pytest.raises(InputError, match=r"^lam_bar_K=.* is not a point of the box Λ\.$"):
    _results(_scores(expert_baseline=False), LAM_BAR, box)


def test_without_the_best_response_there_is_no_certificate_and_a_clear_error():
  scores = _scores(expert_baseline=False)
  without = dataclasses.replace(scores, nll_N={"robust_gate": scores.nll_N["robust_gate"]})
  with pytest.raises(InputError, match=r"^results_on_test needs the methods \['best_response'\]"):
    _results(without)


def test_one_seed_fixes_every_interval():
  scores = _scores(expert_baseline=True)
  assert _results(scores, seed=3) == _results(scores, seed=3)
  one, other = _results(scores, seed=3), _results(scores, seed=4)
  assert one["bootstrap"]["seed"] == 3
  iv = lambda r: r["methods"]["erm_gate"]["intervals"]["worst_case"]
  assert iv(one) != iv(other)
  assert one["methods"]["erm_gate"]["worst_case"] == other["methods"]["erm_gate"]["worst_case"]


@pytest.mark.parametrize("seed", range(6))
def test_rank_correlation_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  size = int(rng.integers(3, 12))
  x = rng.integers(0, 4, size).astype(float)  # ties
  y = rng.normal(size=size)
  y[: size // 3] = y[0]  # ties in both
  if np.ptp(x) == 0:
    x[0] += 1.0
  expected = stats.spearmanr(x, y).statistic
  np.testing.assert_allclose(evaluate.rank_correlation(x, y), expected, rtol=1e-12)
  np.testing.assert_allclose(evaluate.rank_correlation(x, x), 1.0, rtol=1e-12)
  np.testing.assert_allclose(evaluate.rank_correlation(x, -x), -1.0, rtol=1e-12)


def test_rank_correlation_of_a_constant_is_undefined():
  assert math.isnan(evaluate.rank_correlation([1.0, 1.0, 1.0], [0.1, 0.3, 0.2]))
  # A uniform λ̄ (the dual never moved): null in results.json, not NaN.
  r = _results(_scores(expert_baseline=False), np.full(K, 1 / K))
  assert r["lambda_rank_correlation"] is None


def test_results_rank_correlation_is_of_lam_bar_with_the_robust_gate_losses(results):
  loss = list(results["methods"]["robust_gate"]["domain_loss"].values())
  expected = stats.spearmanr(LAM_BAR, loss).statistic
  np.testing.assert_allclose(results["lambda_rank_correlation"], expected, rtol=1e-12)
