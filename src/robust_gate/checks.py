"""Input validation at the library's boundaries.

Jitted code cannot raise on values, so every public entry point that takes user
data checks it here, eagerly, on concrete arrays, and raises `InputError` with a
message that names the problem. Inside jit only shapes are checked (chex).
Scalar arguments are checked before any cast: `int(1.7)` or `int(True)` would
turn a mistake into a silently different run.
"""

import math
import numbers

import numpy as np

# Tolerance for "sums to one" on user-supplied probabilities and log-probabilities.
SUM_ATOL = 1e-4


class InputError(ValueError):
  """A user-caused problem with the inputs; the message names it."""


def check_int(value, name: str, low: int = 1, high: int | None = None) -> int:
  """`value` as an int in [low, high), or InputError naming it. Bools and floats
  are refused, not rounded."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise InputError(f"{name}={value!r} must be an int.")
  n = int(value)
  if n < low or (high is not None and n >= high):
    if high is not None:
      want = f"in [{low}, {high})"
    else:
      want = "positive" if low == 1 else f"≥ {low}"
    raise InputError(f"{name}={value!r} must be {want}.")
  return n


def check_real(
  value,
  name: str,
  low: float = 0.0,
  high: float = math.inf,
  *,
  low_open: bool = False,
  high_open: bool = True,
) -> float:
  """`value` as a finite float in the interval from `low` to `high` (each end
  open or closed), or InputError naming it. Bools are refused."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise InputError(f"{name}={value!r} must be a number.")
  x = float(value)
  if not (
    math.isfinite(x)
    and (x > low if low_open else x >= low)
    and (x < high if high_open else x <= high)
  ):
    if high == math.inf:
      want = f"finite and {'>' if low_open else '≥'} {low:g}"
    else:
      want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise InputError(f"{name}={value!r} must be {want}.")
  return x


def as_float_array(x, name: str, ndim: int) -> np.ndarray:
  """Returns `x` as a float64 numpy array of rank `ndim`, or raises InputError."""
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise InputError(f"{name} must be a numeric array: {e}") from None
  if arr.ndim != ndim:
    raise InputError(f"{name} must have {ndim} dimensions, got shape {arr.shape}.")
  if 0 in arr.shape:
    raise InputError(f"{name} is empty (shape {arr.shape}).")
  return arr


def check_probabilities(probs_KxN, name: str = "domain_probs_KxN") -> np.ndarray:
  """Checks that every row is a probability vector over the N points."""
  probs = as_float_array(probs_KxN, name, 2)
  if not np.all(np.isfinite(probs)):
    raise InputError(f"{name} contains NaN or infinite values.")
  if np.any(probs < 0):
    k, n = np.argwhere(probs < 0)[0]
    raise InputError(f"{name}[{k}, {n}] = {probs[k, n]} is negative.")
  sums = probs.sum(axis=1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > SUM_ATOL)
  if bad.size:
    raise InputError(
      f"{name} row {bad[0]} sums to {sums[bad[0]]:.6g}, not 1 "
      f"(rows must be probability distributions)."
    )
  return probs


def check_logprobs(logp_MxN, name: str = "expert_logprobs_MxN") -> np.ndarray:
  """Checks finite-space expert log-probabilities: no NaN/+inf, each row normalized.

  `-inf` (no mass) is legal.
  """
  logp = as_float_array(logp_MxN, name, 2)
  if np.any(np.isnan(logp)):
    j, n = np.argwhere(np.isnan(logp))[0]
    raise InputError(f"{name}[{j}, {n}] is NaN.")
  if np.any(logp == np.inf):
    j, n = np.argwhere(logp == np.inf)[0]
    raise InputError(f"{name}[{j}, {n}] is +inf: an expert cannot have infinite log-probability.")
  row_max = logp.max(axis=1)
  dead = np.flatnonzero(row_max == -np.inf)
  if dead.size:
    raise InputError(
      f"{name} row {dead[0]} is -inf everywhere: expert {dead[0]} has no mass at all."
    )
  log_sums = row_max + np.log(np.exp(logp - row_max[:, None]).sum(axis=1))
  bad = np.flatnonzero(np.abs(np.expm1(log_sums)) > SUM_ATOL)
  if bad.size:
    raise InputError(
      f"{name} row {bad[0]}: expert {bad[0]}'s probabilities sum to "
      f"{np.exp(log_sums[bad[0]]):.6g}, not 1 (experts must be normalized)."
    )
  return logp


def check_support(probs_KxN: np.ndarray, logp_MxN: np.ndarray) -> None:
  """Every point where some domain has mass must have mass under some expert.

  Otherwise every gated model puts zero mass there and the loss is infinite.
  """
  if probs_KxN.shape[1] != logp_MxN.shape[1]:
    raise InputError(
      f"domain_probs has N={probs_KxN.shape[1]} points but expert_logprobs has "
      f"N={logp_MxN.shape[1]}: both must index the same finite space."
    )
  uncovered = (probs_KxN > 0) & (logp_MxN.max(axis=0) == -np.inf)[None, :]
  if np.any(uncovered):
    k, n = np.argwhere(uncovered)[0]
    raise InputError(
      f"point {n} has mass {probs_KxN[k, n]:.3g} under domain {k} but every "
      f"expert gives it log-probability -inf: the loss would be infinite."
    )


def check_token_logprobs(logp_BxTxM, mask_BxT=None, name: str = "logp_BxTxM") -> np.ndarray:
  """Checks cached per-token expert log-probs `log p_j(x_t | x_<t)`.

  NaN, +inf and positive values are errors; `-inf` is legal unless every
  expert gives `-inf` to a token that occurs (mask true).
  """
  logp = as_float_array(logp_BxTxM, name, 3)
  if np.any(np.isnan(logp)):
    idx = tuple(int(i) for i in np.argwhere(np.isnan(logp))[0])
    raise InputError(f"{name}{list(idx)} is NaN.")
  if np.any(logp > 1e-5):
    idx = tuple(int(i) for i in np.argwhere(logp > 1e-5)[0])
    raise InputError(
      f"{name}{list(idx)} = {logp[idx]:.4g} > 0: not the log-probability of a token."
    )
  mask = np.ones(logp.shape[:2], bool) if mask_BxT is None else np.asarray(mask_BxT, bool)
  if mask.shape != logp.shape[:2]:
    raise InputError(
      f"mask shape {mask.shape} does not match {name} shape {logp.shape[:2]} (batch, time)."
    )
  dead = mask & np.all(logp == -np.inf, axis=-1)
  if np.any(dead):
    b, t = np.argwhere(dead)[0]
    raise InputError(
      f"token at (example {b}, position {t}) has log-probability "
      f"-inf under every expert: the loss would be infinite."
    )
  return logp
