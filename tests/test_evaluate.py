"""robust_gate.evaluate on hand-made inputs whose answers are known exactly."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from tolerances import F32_RTOL

from robust_gate import data, evaluate, models, primal_dual, records, shards, summary, uncertainty
from robust_gate.checks import InputError

# Three examples, two domains: example 0 = [1, 2] and example 2 = [2, 2, 1] are
# domain "a", example 1 = [1] is domain "b". With BOS/EOS an example of n tokens
# predicts n + 1 targets, so a has 3 + 4 = 7 scored tokens and b has 2.
DOMAINS = ("a", "b")
DATA = data.encode(
  [np.array([1, 2]), np.array([1]), np.array([2, 2, 1])],
  np.array([0, 1, 0]),
  DOMAINS,
  vocab_size=3,
  max_len=5,
)
MASKED_OUT = -100.0  # a value at padding positions; it must never be counted


def test_the_example_has_the_counts_the_hand_computations_use():
  np.testing.assert_array_equal(DATA.mask_NxT.sum(axis=1), [3, 2, 4])
  np.testing.assert_array_equal(DATA.counts(), [2, 1])


def test_domain_ce_is_the_token_weighted_mean_nll_per_domain():
  logp = np.full((3, 5), MASKED_OUT)
  logp[0, :3] = [-1.0, -2.0, -3.0]
  logp[1, :2] = [-0.5, -1.5]
  logp[2, :4] = [-1.0, -1.0, -1.0, -1.0]
  # a: (1 + 2 + 3 + 4 · 1) / 7 tokens; b: (0.5 + 1.5) / 2 tokens. Not the mean of the
  # per-example means ((2 + 1) / 2 = 1.5 for a).
  np.testing.assert_allclose(evaluate.domain_ce(logp, DATA), [10 / 7, 1.0], rtol=1e-12)


def test_a_domain_without_examples_is_refused_before_evaluation():
  # domain_ce divides by each domain's token count; encode guarantees it is not 0.
  with pytest.raises(InputError, match=r"^domain 'c' has no examples\.$"):
    data.encode([np.array([1]), np.array([2])], np.array([0, 1]), ("a", "b", "c"), 3, 5)


def test_a_domain_without_tokens_is_an_error_not_nan():
  # Data that bypassed encode (here a subset without domain b's one example).
  without_b = DATA.subset(np.array([0, 2]))
  with pytest.raises(InputError, match=r"^domain 'b' has no tokens"):
    evaluate.domain_ce(np.zeros((2, 5)), without_b)


def test_usage_is_the_token_weighted_mean_gate_weight():
  gate = np.full((3, 5, 2), 9.0)  # 9 at padding: must never be counted
  gate[0, :3] = [0.25, 0.75]
  gate[1, :2] = [1.0, 0.0]
  gate[2, :4] = [0.5, 0.5]
  use = evaluate.usage(gate, DATA)
  # a: (3 · [0.25, 0.75] + 4 · [0.5, 0.5]) / 7.
  np.testing.assert_allclose(use, [[2.75 / 7, 4.25 / 7], [1.0, 0.0]], rtol=1e-12)
  np.testing.assert_allclose(use.sum(axis=1), [1.0, 1.0], rtol=1e-12)


def test_usage_of_any_gate_sums_to_one_per_domain():
  rng = np.random.default_rng(0)
  gate = rng.dirichlet(np.ones(4), size=(3, 5))  # [N, T, M], every position normalized
  np.testing.assert_allclose(evaluate.usage(gate, DATA).sum(axis=1), [1.0, 1.0], rtol=1e-12)


# Excess losses L = [0.25, 1.0, 0.5] bits/token: CE_k = b_k + L_k · ln 2 nats.
LOSS_BITS = np.array([0.25, 1.0, 0.5])
BASELINE_NATS = np.array([0.7, 1.1, 0.3])
CE_NATS = BASELINE_NATS + LOSS_BITS * math.log(2)


def test_method_entry_over_the_simplex_is_the_largest_domain_loss():
  e = evaluate.method_entry(CE_NATS, BASELINE_NATS, uncertainty.simplex(3), ["x", "y", "z"])
  assert list(e) == ["domain_loss", "domain_ce", "mean", "worst_case"]
  assert list(e["domain_loss"]) == ["x", "y", "z"]
  np.testing.assert_allclose(list(e["domain_loss"].values()), LOSS_BITS, rtol=1e-12)
  np.testing.assert_allclose(
    list(e["domain_ce"].values()), CE_NATS / math.log(2), rtol=1e-12
  )  # bits, like the losses
  np.testing.assert_allclose(e["mean"], 1.75 / 3, rtol=1e-12)
  np.testing.assert_allclose(e["worst_case"], 1.0, rtol=F32_RTOL)  # float32 max_linear


def test_method_entry_over_a_box_is_the_linear_program_value():
  lam_set = uncertainty.box([0.1, 0.1, 0.1], [0.5, 0.5, 0.5])
  e = evaluate.method_entry(CE_NATS, BASELINE_NATS, lam_set, ["x", "y", "z"])
  # Greedy by hand: every λ_k starts at 0.1; the 0.7 left goes to the largest loss
  # first up to 0.5 (y), then 0.3 to the next (z): λ = (0.1, 0.5, 0.4).
  np.testing.assert_allclose(e["worst_case"], 0.1 * 0.25 + 0.5 * 1.0 + 0.4 * 0.5, rtol=F32_RTOL)
  # The same number from an LP solver: max L·λ s.t. Σλ = 1, 0.1 ≤ λ ≤ 0.5.
  lp = optimize.linprog(-LOSS_BITS, A_eq=np.ones((1, 3)), b_eq=[1.0], bounds=[(0.1, 0.5)] * 3)
  assert lp.success
  np.testing.assert_allclose(e["worst_case"], -lp.fun, rtol=F32_RTOL)
  np.testing.assert_allclose(-lp.fun, 0.725, rtol=1e-9)


# Per-domain losses linear in two parameter leaves: ∇L_k = (g_k, h_k), known exactly.
def _linear_loss(G_KxA, H_KxB):
  def loss_fn(p, batch, key):
    del batch, key
    return jnp.asarray(G_KxA, jnp.float32) @ p["a"] + jnp.asarray(H_KxB, jnp.float32) @ p["b"]

  return loss_fn


PARAMS = {"a": jnp.array([0.3, -0.2]), "b": jnp.array([1.0, 2.0, 3.0])}
G_KxA = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])


def test_gradient_conflict_is_the_cosine_matrix_of_the_domain_gradients():
  cos = evaluate.gradient_conflict(_linear_loss(G_KxA, np.zeros((3, 3))), PARAMS, key=None)
  r = 1 / math.sqrt(2)
  np.testing.assert_allclose(cos, [[1, r, 0], [r, 1, r], [0, r, 1]], rtol=F32_RTOL, atol=1e-7)
  np.testing.assert_allclose(np.diag(cos), 1.0, rtol=F32_RTOL)
  np.testing.assert_array_equal(cos, cos.T)


def test_gradient_conflict_concatenates_every_parameter_leaf():
  H_KxB = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  cos = evaluate.gradient_conflict(_linear_loss(G_KxA, H_KxB), PARAMS, key=None)
  # ∇L_0 = (1, 0, 0, 1, 0), ∇L_1 = (1, 1, -1, 0, 0), ∇L_2 = (0, 2, 0, 0, 0): the
  # cosine of domains 0 and 1 is 1/√6 with both leaves, 1/√2 with `a` alone.
  g = np.array([[1, 0, 0, 1, 0], [1, 1, -1, 0, 0], [0, 2, 0, 0, 0]], float)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  np.testing.assert_allclose(cos, g @ g.T, rtol=F32_RTOL, atol=1e-7)
  np.testing.assert_allclose(cos[0, 1], 1 / math.sqrt(6), rtol=F32_RTOL)
  np.testing.assert_allclose(np.diag(cos), 1.0, rtol=F32_RTOL)
  np.testing.assert_array_equal(cos, cos.T)


def _two_methods() -> dict:
  return {
    "robust_gate": {
      "domain_loss": {"english": 0.5, "finnish": 0.25},
      "mean": 0.375,
      "worst_case": 0.5,
    },
    "best_response": {
      "domain_loss": {"english": 0.0, "finnish": 2.125},
      "mean": 1.0625,
      "worst_case": 2.125,
    },
  }


def test_format_table_of_results_without_intervals():
  """An older workdir's results.json (the notebooks print it) prints its point estimates."""
  results = {
    "units": "bits/token",
    "baseline": "entropy",
    "domains": ["english", "finnish"],
    "methods": _two_methods(),
    "lambda_bar": {"english": 0.75, "finnish": 0.25},
  }
  lines = summary.format_table(results).splitlines()
  assert lines[0] == "per-domain loss L_k, bits/token (baseline: entropy)"
  assert lines[1].split() == ["method", "english", "finnish", "mean", "worst"]
  assert set(lines[2]) == {"-"}
  assert lines[3].split() == ["robust_gate", "0.5000", "0.2500", "0.3750", "0.5000"]
  # Aligned with the other rows: λ̄ is λ and a combining bar, one column.
  assert lines[4] == "best response to λ̄" + " " * 4 + "    0.0000    2.1250    1.0625    2.1250"
  assert lines[5] == "λ̄ (robust gate): english=0.750, finnish=0.250"
  assert len(lines) == 6


def test_format_table_shows_the_worst_case_interval_and_the_certificate():
  methods = _two_methods()
  methods["robust_gate"]["intervals"] = {"worst_case": [0.4875, 0.51]}
  methods["best_response"]["intervals"] = {"worst_case": [2.0, 2.25]}
  results = {
    "units": "bits/token",
    "baseline": "expert",
    "domains": ["english", "finnish"],
    "methods": methods,
    "lambda_bar": {"english": 0.75, "finnish": 0.25},
    "bootstrap": {"resamples": 1000, "level": 0.95, "over": "test sequences", "seed": 0},
    "certificate": {
      "upper": [0.5, 0.4875, 0.51],
      "lower": [0.4, 0.39, 0.41],
      "gap": [0.1, 0.0875, 0.12],
      "lower_is_estimate": True,
    },
    "lambda_rank_correlation": -0.5,
  }
  lines = summary.format_table(results).splitlines()
  assert lines[0].endswith("; intervals over test sequences (1000 resamples)")
  assert lines[1].split()[-2:] == ["95%", "interval"]
  assert lines[3].endswith("0.3750    0.5000  [0.4875, 0.5100]")
  assert lines[4].endswith("2.1250  [2.0000, 2.2500]")
  assert lines[6] == (
    "certificate of the robust gate, bits/token: upper 0.5000 [0.4875, 0.5100], "
    "lower (estimate) 0.4000 [0.3900, 0.4100], gap 0.1000 [0.0875, 0.1200]"
  )
  assert lines[7] == "rank correlation (Spearman) of λ̄ with the robust gate's L_k: -0.500"
  results["lambda_rank_correlation"] = None
  assert summary.format_table(results).endswith("L_k: undefined (a constant λ̄ or L)")


# Tiny models for methods_on_test: a gate and a transformer of DATA's vocabulary and length.
GATE_CFG = models.GateConfig(num_experts=2, vocab_size=3, max_len=5, hidden=4, pos_embed=2)
LM_CFG = models.LMConfig(vocab_size=3, max_len=5, d_model=8, num_layers=1, num_heads=2, d_ff=8)


def _trained_models(cache_NxTxM, baseline_K) -> records.TrainedModels:
  """The records methods_on_test reads, built directly; what it does not read is None."""

  def gate(seed):
    params = models.init_gate(GATE_CFG, jax.random.PRNGKey(seed))
    state = primal_dual.GameState(None, params, None, None, jnp.full(2, 0.5), params, None)
    return records.Gate(GATE_CFG, state, loss_fn=None)

  def lm(seed):
    return models.init_lm(LM_CFG, jax.random.PRNGKey(seed))

  names = [f.name for f in dataclasses.fields(records.Gates)]
  test = records.Scored(DATA, cache_NxTxM, baseline_K)
  unread = {f.name: None for f in dataclasses.fields(records.Caches)}
  return records.TrainedModels(
    splits=None,
    caches=records.Caches(**(unread | {"test": test})),
    gates=records.Gates(**{n: gate(i) for i, n in enumerate(names)}),
    student=records.Student(LM_CFG, lm(10), init_from=0),
    monoliths=records.Monoliths(
      **{n: records.Monolithic(LM_CFG, lm(11 + i), None) for i, n in enumerate(MONOLITHS)}
    ),
  )


MONOLITHS = ("monolithic", "monolithic_dro", "monolithic_large")


@pytest.fixture(scope="module")
def scored():
  """methods_on_test on DATA with a random cache of two experts (one per domain)."""
  rng = np.random.default_rng(0)
  cache = np.log(rng.dirichlet(np.ones(3), size=(3, 5)))[..., :2].astype(np.float32)
  baseline_K = np.array([evaluate.domain_ce(cache[..., k], DATA)[k] for k in range(2)])
  m = _trained_models(cache, baseline_K)
  return m, cache, evaluate.methods_on_test(m, "expert")


def test_methods_on_test_scores_every_method_per_sequence(scored):
  m, cache, (scores, use) = scored
  gates = [name for name, _ in m.gates.items()]
  assert "best_response" in gates
  assert list(scores.nll_N) == [
    *gates,
    "uniform_mixture",
    "posterior_gate",
    "monolithic",
    "monolithic_large",
    "monolithic_dro",
    "student",
    "expert:a",
    "expert:b",
  ]
  assert list(use) == [*gates, "posterior_gate"]
  np.testing.assert_array_equal(scores.tokens_N, [3, 2, 4])
  np.testing.assert_array_equal(scores.domain_N, DATA.domain_N)
  for name, nll_N in scores.nll_N.items():
    assert nll_N.shape == (3,) and nll_N.dtype == np.float64 and np.all(nll_N > 0), name
  # Per-sequence sums over the real tokens only, and the per-domain CE they give.
  expert_a = -np.array([cache[0, :3, 0].sum(), cache[1, :2, 0].sum(), cache[2, :4, 0].sum()])
  np.testing.assert_allclose(scores.nll_N["expert:a"], expert_a, rtol=1e-6)
  for name, logp in (("expert:b", cache[..., 1]), ("student", _lm_logp(m.student.params))):
    np.testing.assert_allclose(scores.domain_ce(name), evaluate.domain_ce(logp, DATA), rtol=1e-6)
  mixture_NxT = np.logaddexp(cache[..., 0], cache[..., 1]) - np.log(2)
  np.testing.assert_allclose(
    scores.domain_ce("uniform_mixture"), evaluate.domain_ce(mixture_NxT, DATA), rtol=1e-5
  )


def _lm_logp(params):
  return evaluate.lm_logprobs(LM_CFG, params, DATA)


def test_methods_on_test_keeps_the_expert_baseline_per_sequence(scored):
  """With the "expert" baseline, each sequence's NLL under its own domain's expert (a:
  sequences 0 and 2, expert 0; b: sequence 1, expert 1), whose sums are b_k."""
  m, _, (scores, _) = scored
  own_N = [scores.nll_N["expert:a"][0], scores.nll_N["expert:b"][1], scores.nll_N["expert:a"][2]]
  np.testing.assert_array_equal(scores.baseline_nll_N, own_N)
  K = 2
  own_K = np.bincount(scores.domain_N, scores.baseline_nll_N, K) / np.bincount(
    scores.domain_N, scores.tokens_N, K
  )
  np.testing.assert_allclose(own_K, m.caches.test.baseline_K, rtol=1e-12)
  nll_N, b_K = scores.resampled("robust_gate")
  np.testing.assert_array_equal(nll_N, scores.nll_N["robust_gate"] - scores.baseline_nll_N)
  np.testing.assert_array_equal(b_K, [0.0, 0.0])
  fixed, _ = evaluate.methods_on_test(m, "entropy")
  assert fixed.baseline_nll_N is None
  assert fixed.resampled("robust_gate")[1] is fixed.baseline_K


@pytest.mark.parametrize("block_rows", [1, 2])
def test_methods_on_test_in_blocks_reads_a_block_at_a_time_and_scores_the_same(
  scored, block_rows, tmp_path, monkeypatch
):
  """The test split read `block_rows` sequences at a time, its cache from shards on disk:
  the same scores and usage as one block in memory, and no read of more rows than a block."""
  m, cache, (whole, whole_use) = scored
  sharded = shards.build(
    str(tmp_path / "cache"),
    fingerprint="test",
    shape=cache.shape,
    dtype=np.float32,
    shard_rows=1,
    compute=lambda lo, hi: cache[lo:hi],
    log=lambda s: None,
  )
  reads = []
  read = shards.ShardedArray.__array__

  def counted(self, *args, **kwargs):
    reads.append(len(self))
    return read(self, *args, **kwargs)

  monkeypatch.setattr(shards.ShardedArray, "__array__", counted)
  test = dataclasses.replace(m.caches.test, cache_NxTxM=sharded)
  blocked = dataclasses.replace(m, caches=dataclasses.replace(m.caches, test=test))
  scores, use = evaluate.methods_on_test(blocked, "expert", block_rows=block_rows)
  assert reads and max(reads) <= block_rows and sum(reads) == len(cache)
  assert list(scores.nll_N) == list(whole.nll_N) and list(use) == list(whole_use)
  for name, nll_N in scores.nll_N.items():
    np.testing.assert_allclose(nll_N, whole.nll_N[name], rtol=F32_RTOL, err_msg=name)
  for name, u in use.items():
    np.testing.assert_allclose(u, whole_use[name], rtol=F32_RTOL, err_msg=name)
  np.testing.assert_array_equal(scores.tokens_N, whole.tokens_N)
  np.testing.assert_array_equal(scores.baseline_nll_N, whole.baseline_nll_N)
  with pytest.raises(InputError, match="block_rows must be at least 1"):
    evaluate.methods_on_test(blocked, "expert", block_rows=0)
