"""robust_gate.checks: every validator accepts valid input and names each problem."""

import re

import numpy as np
import pytest

from robust_gate import checks
from robust_gate.checks import InputError

NEG_INF = -np.inf


def _refused(message: str, fn, *args, **kwargs):
  """`fn(*args)` raises InputError with exactly `message`."""
  with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
    fn(*args, **kwargs)


def test_input_error_is_a_value_error():
  assert issubclass(InputError, ValueError)


# as_float_array


def test_as_float_array_returns_float64_of_the_rank_asked():
  arr = checks.as_float_array([[1, 2], [3, 4]], "x", 2)
  assert arr.dtype == np.float64 and arr.shape == (2, 2)
  np.testing.assert_array_equal(arr, [[1.0, 2.0], [3.0, 4.0]])


def test_as_float_array_refuses_non_numbers_wrong_rank_and_empty():
  _refused(
    "x must be a numeric array: could not convert string to float: 'a'",
    checks.as_float_array,
    [["a"]],
    "x",
    2,
  )
  with pytest.raises(InputError, match=r"^ragged must be a numeric array: "):
    checks.as_float_array([[1.0, 2.0], [3.0]], "ragged", 2)
  _refused("x must have 2 dimensions, got shape (3,).", checks.as_float_array, [1, 2, 3], "x", 2)
  _refused("x is empty (shape (0, 3)).", checks.as_float_array, np.zeros((0, 3)), "x", 2)


# check_probabilities


def test_check_probabilities_accepts_rows_that_sum_to_one():
  probs = checks.check_probabilities([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]])
  assert probs.dtype == np.float64
  np.testing.assert_array_equal(probs, [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]])
  checks.check_probabilities([[0.5, 0.5 + 0.9 * checks.SUM_ATOL]])  # within the tolerance


def test_check_probabilities_names_each_problem():
  _refused(
    "domain_probs_KxN contains NaN or infinite values.",
    checks.check_probabilities,
    [[0.5, np.nan]],
  )
  _refused(
    "domain_probs_KxN contains NaN or infinite values.",
    checks.check_probabilities,
    [[0.5, np.inf]],
  )
  _refused(
    "domain_probs_KxN[1, 2] = -0.1 is negative.",
    checks.check_probabilities,
    [[0.5, 0.5, 0.0], [0.5, 0.6, -0.1]],
  )
  _refused(
    "domain_probs_KxN row 1 sums to 0.6, not 1 (rows must be probability distributions).",
    checks.check_probabilities,
    [[0.5, 0.5], [0.3, 0.3]],
  )
  _refused(
    "mine row 0 sums to 1.0002, not 1 (rows must be probability distributions).",
    checks.check_probabilities,
    [[0.5, 0.5002]],
    "mine",
  )
  _refused(
    "domain_probs_KxN must have 2 dimensions, got shape (2,).",
    checks.check_probabilities,
    [0.5, 0.5],
  )


# check_logprobs


def test_check_logprobs_accepts_normalized_rows_with_minus_inf():
  log_half = np.log(0.5)
  logp = np.array([[log_half, log_half, NEG_INF], np.log([0.2, 0.3, 0.5])])  # -inf: no mass, legal
  np.testing.assert_array_equal(checks.check_logprobs(logp), logp)


def test_check_logprobs_names_each_problem():
  _refused(
    "expert_logprobs_MxN[1, 0] is NaN.",
    checks.check_logprobs,
    [[0.0, NEG_INF], [np.nan, 0.0]],
  )
  _refused(
    "expert_logprobs_MxN[0, 1] is +inf: an expert cannot have infinite log-probability.",
    checks.check_logprobs,
    [[0.0, np.inf]],
  )
  _refused(
    "expert_logprobs_MxN row 1 is -inf everywhere: expert 1 has no mass at all.",
    checks.check_logprobs,
    [[0.0, NEG_INF], [NEG_INF, NEG_INF]],
  )
  _refused(
    "expert_logprobs_MxN row 0: expert 0's probabilities sum to 1.1, not 1 "
    "(experts must be normalized).",
    checks.check_logprobs,
    np.log([[0.5, 0.6]]),
  )
  _refused(
    "experts must have 2 dimensions, got shape (2,).",
    checks.check_logprobs,
    [0.0, NEG_INF],
    "experts",
  )


# check_support


def test_check_support_accepts_every_domain_point_covered():
  probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
  # Point 2 has no expert mass, but no domain has mass there either.
  logp = np.array([[0.0, NEG_INF, NEG_INF], [NEG_INF, 0.0, NEG_INF]])
  assert checks.check_support(probs, logp) is None


def test_check_support_names_each_problem():
  _refused(
    "domain_probs has N=3 points but expert_logprobs has N=2: both must index the same "
    "finite space.",
    checks.check_support,
    np.full((1, 3), 1 / 3),
    np.log(np.full((1, 2), 0.5)),
  )
  _refused(
    "point 1 has mass 0.25 under domain 1 but every expert gives it log-probability -inf: "
    "the loss would be infinite.",
    checks.check_support,
    np.array([[1.0, 0.0], [0.75, 0.25]]),
    np.array([[0.0, NEG_INF], [0.0, NEG_INF]]),
  )


# check_token_logprobs


def test_check_token_logprobs_accepts_log_probabilities_and_masked_dead_tokens():
  logp = np.array([[[np.log(0.5), NEG_INF], np.log([0.1, 0.2])], [[0.0, 0.0], np.log([0.3, 0.4])]])
  np.testing.assert_array_equal(checks.check_token_logprobs(logp), logp)
  # -inf under every expert is legal where the token does not occur (mask false).
  dead = logp.copy()
  dead[1, 1] = NEG_INF
  np.testing.assert_array_equal(
    checks.check_token_logprobs(dead, np.array([[True, True], [True, False]])), dead
  )
  checks.check_token_logprobs(np.full((1, 1, 2), 0.9e-5))  # rounding above 0 is tolerated


def test_check_token_logprobs_names_each_problem():
  ok = np.log(np.full((2, 2, 2), 0.5))
  _refused(
    "logp_BxTxM must have 3 dimensions, got shape (2, 2).",
    checks.check_token_logprobs,
    ok[0],
  )
  nan = ok.copy()
  nan[0, 1, 0] = np.nan
  _refused("logp_BxTxM[0, 1, 0] is NaN.", checks.check_token_logprobs, nan)
  positive = ok.copy()
  positive[1, 0, 1] = 0.5
  _refused(
    "logp_BxTxM[1, 0, 1] = 0.5 > 0: not the log-probability of a token.",
    checks.check_token_logprobs,
    positive,
  )
  _refused(
    "mask shape (2, 3) does not match cache shape (2, 2) (batch, time).",
    checks.check_token_logprobs,
    ok,
    np.ones((2, 3), bool),
    "cache",
  )
  dead = ok.copy()
  dead[1, 0] = NEG_INF
  _refused(
    "token at (example 1, position 0) has log-probability -inf under every expert: the loss "
    "would be infinite.",
    checks.check_token_logprobs,
    dead,
  )


# check_int, check_real


def test_check_int_returns_ints_in_range():
  assert checks.check_int(3, "n") == 3
  assert type(checks.check_int(np.int64(3), "n")) is int
  assert checks.check_int(0, "seed", 0) == 0
  assert checks.check_int(9, "n", 0, 10) == 9


def test_check_int_refuses_other_types_and_out_of_range_without_rounding():
  _refused("steps=True must be an int.", checks.check_int, True, "steps")
  _refused("steps=1.7 must be an int.", checks.check_int, 1.7, "steps")
  _refused("steps=2.0 must be an int.", checks.check_int, 2.0, "steps")
  _refused("steps='3' must be an int.", checks.check_int, "3", "steps")
  _refused("steps=0 must be positive.", checks.check_int, 0, "steps")
  _refused("seed=-1 must be ≥ 0.", checks.check_int, -1, "seed", 0)
  _refused("k=10 must be in [0, 10).", checks.check_int, 10, "k", 0, 10)


def test_check_real_returns_floats_in_the_interval():
  assert checks.check_real(0, "lr") == 0.0 and type(checks.check_real(1, "lr")) is float
  assert checks.check_real(np.float32(0.5), "decay", 0.0, 1.0) == 0.5
  assert checks.check_real(1.0, "noise", 0.0, 1.0, high_open=False) == 1.0


def test_check_real_refuses_other_types_nan_and_out_of_interval():
  _refused("lr=True must be a number.", checks.check_real, True, "lr")
  _refused("lr='0.1' must be a number.", checks.check_real, "0.1", "lr")
  _refused("lr=nan must be finite and > 0.", checks.check_real, np.nan, "lr", low_open=True)
  _refused("lr=0 must be finite and > 0.", checks.check_real, 0, "lr", low_open=True)
  _refused("lr=inf must be finite and ≥ 0.", checks.check_real, np.inf, "lr")
  _refused("decay=1.0 must be in [0, 1).", checks.check_real, 1.0, "decay", 0.0, 1.0)
  _refused(
    "noise=1.5 must be in [0, 1].", checks.check_real, 1.5, "noise", 0.0, 1.0, high_open=False
  )
