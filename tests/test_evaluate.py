"""robust_gate.evaluate on hand-made inputs whose answers are known exactly."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from tolerances import F32_RTOL

from robust_gate import data, evaluate, uncertainty
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


def test_format_table_names_every_method_with_its_numbers():
  results = {
    "units": "bits/token",
    "baseline": "entropy",
    "domains": ["english", "finnish"],
    "methods": {
      "robust_gate": {
        "domain_loss": {"english": 0.5, "finnish": 0.25},
        "mean": 0.375,
        "worst_case": 0.5,
      },
      "expert:english": {
        "domain_loss": {"english": 0.0, "finnish": 2.125},
        "mean": 1.0625,
        "worst_case": 2.125,
      },
    },
    "lambda_bar": {"english": 0.75, "finnish": 0.25},
  }
  lines = evaluate.format_table(results).splitlines()
  assert lines[0] == "per-domain loss L_k, bits/token (baseline: entropy)"
  assert lines[1].split() == ["method", "english", "finnish", "mean", "worst"]
  assert set(lines[2]) == {"-"}
  assert lines[3].split() == ["robust_gate", "0.5000", "0.2500", "0.3750", "0.5000"]
  assert lines[4].split() == ["expert:english", "0.0000", "2.1250", "1.0625", "2.1250"]
  assert lines[5] == "λ̄ (robust gate): english=0.750, finnish=0.250"
  assert len(lines) == 6
