import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import F32_RTOL

from robust_gate import dual, uncertainty


def test_simplex_step_is_exponentiated_gradient():
  s = uncertainty.simplex(3)
  d = dual.mirror_ascent(0.5, s)
  state = d.init()
  losses = jnp.array([1.0, 0.0, -1.0])
  lam, state = d.update(losses, state)
  expected = np.exp(0.5 * np.array([1.0, 0.0, -1.0]))
  np.testing.assert_allclose(lam, expected / expected.sum(), rtol=F32_RTOL)
  assert int(state.count) == 1


def test_zero_learning_rate_keeps_lambda_fixed():
  s = uncertainty.simplex(4)
  d = dual.mirror_ascent(0.0, s)
  state = d.init(jnp.array([0.1, 0.2, 0.3, 0.4]))
  for _ in range(3):
    lam, state = d.update(jnp.array([5.0, -1.0, 2.0, 0.0]), state)
  np.testing.assert_allclose(lam, [0.1, 0.2, 0.3, 0.4], rtol=F32_RTOL)


@pytest.mark.parametrize(
  "lam_set",
  [uncertainty.box([0.5, 0.1, 0.1], [0.8, 0.4, 0.4]), uncertainty.kl_ball([0.7, 0.2, 0.1], 0.05)],
  ids=["box", "kl_ball"],
)
def test_lambda_starts_in_a_set_without_the_uniform_mixture_and_stays_at_eta_0(lam_set):
  """Where Λ excludes the uniform mixture, λ starts at Λ's prior, or at the KL projection
  of a λ given outside Λ: a point of Λ from step 0, which η = 0 keeps."""
  assert not lam_set.contains(np.full(3, 1 / 3))
  d = dual.mirror_ascent(0.0, lam_set)
  for start, expected in ((None, lam_set.prior_K), (jnp.full(3, 1 / 3), None)):
    state = d.init(start)
    lam = jnp.exp(state.log_lam_K)
    assert lam_set.contains(lam)
    if expected is not None:
      np.testing.assert_allclose(lam, expected, rtol=F32_RTOL)
    for _ in range(3):
      lam_next, state = d.update(jnp.array([5.0, -1.0, 2.0]), state)
      np.testing.assert_allclose(lam_next, lam, rtol=F32_RTOL)


def test_schedule_and_smoothing():
  s = uncertainty.simplex(2)
  d = dual.mirror_ascent(optax.constant_schedule(1.0), s, smoothing=0.25)
  lam, _ = d.update(jnp.array([1.0, 0.0]), d.init())
  q = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
  np.testing.assert_allclose(lam, 0.75 * q + 0.25 * 0.5, rtol=F32_RTOL)


def test_ascent_finds_the_worst_domain():
  """With fixed losses, λ concentrates on the largest one (Λ = simplex): after t steps
  of exponentiated gradient from uniform, λ_t = softmax(η t L) exactly."""
  losses = np.array([0.2, 0.9, 0.5])
  d = dual.mirror_ascent(0.3, uncertainty.simplex(3))
  update = jax.jit(d.update)
  state = d.init()
  for t in range(1, 201):
    lam, state = update(jnp.asarray(losses, jnp.float32), state)
    if t in (1, 10):
      z = np.exp(0.3 * t * losses)
      np.testing.assert_allclose(lam, z / z.sum(), rtol=F32_RTOL)
  # softmax(60 L): e^{-42} and e^{-24} of the mass left on domains 0 and 2. Compared
  # in log space: 200 float32 steps on log λ of size ~40 accumulate ~1e-4 absolute.
  np.testing.assert_allclose(np.log(lam), [-42.0, 0.0, -24.0], atol=1e-3)


def test_bad_smoothing_is_an_error():
  with pytest.raises(ValueError, match=r"^dual smoothing must be in \[0, 1\), got 1\.0\.$"):
    dual.mirror_ascent(0.1, uncertainty.simplex(2), smoothing=1.0)
  with pytest.raises(ValueError, match=r"^dual smoothing must be in \[0, 1\), got -0\.1\.$"):
    dual.mirror_ascent(0.1, uncertainty.simplex(2), smoothing=-0.1)


_SETS = (
  uncertainty.simplex(3),
  uncertainty.box([0.1, 0.0, 0.2], [0.6, 0.5, 1.0]),
  uncertainty.kl_ball([0.2, 0.3, 0.5], 0.1),
)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _first_update(losses_K, lr, eps, set_index):
  """λ after one update from the prior: η traced, so that one program per set and ε serves
  every example (compiled per example, the property test took minutes)."""
  d = dual.mirror_ascent(lr, _SETS[set_index], smoothing=eps)
  return d.update(losses_K, d.init())[0]


@settings(max_examples=100, deadline=None)
@given(
  hnp.arrays(np.float32, 3, elements=st.floats(-50, 50, width=32)),
  st.floats(0, 10),
  st.sampled_from((0.0, 0.1, 0.5, 0.9)),  # ε's code path is one for every ε > 0
)
def test_any_finite_losses_keep_lambda_in_the_set(losses, lr, eps):
  for i, s in enumerate(_SETS):
    lam = _first_update(jnp.asarray(losses), lr, eps, i)
    assert np.all(np.isfinite(lam))
    assert s.contains(np.asarray(lam), atol=1e-4), (s.kind, lam)


def test_inverse_sqrt_schedule():
  schedule = dual.inverse_sqrt_schedule(0.4, timescale=10.0)
  np.testing.assert_allclose(
    [schedule(t) for t in (0, 10, 30)], [0.4, 0.4 / np.sqrt(2), 0.2], rtol=F32_RTOL
  )
  d = dual.mirror_ascent(schedule, uncertainty.simplex(2))
  state = d.init()
  for _ in range(31):  # the 31st update uses η_30 = 0.2
    before = np.asarray(state.log_lam_K)
    lam, state = d.update(jnp.array([1.0, 0.0]), state)
  np.testing.assert_allclose(np.diff(np.log(lam)) - np.diff(before), -0.2, rtol=F32_RTOL)
  with pytest.raises(ValueError, match=r"^inverse_sqrt_schedule needs learning_rate ≥ 0"):
    dual.inverse_sqrt_schedule(0.1, timescale=0.0)


def test_optimistic_step_uses_twice_the_new_losses_minus_the_old():
  s = uncertainty.simplex(3)
  d = dual.mirror_ascent(0.5, s, optimistic=True)
  state = d.init()
  assert isinstance(state, dual.OptimisticDualState)
  g0, g1 = np.array([1.0, 0.0, -1.0]), np.array([0.0, 2.0, 0.5])
  lam1, state = d.update(jnp.asarray(g0, jnp.float32), state)
  plain1, _ = dual.mirror_ascent(0.5, s).update(jnp.asarray(g0, jnp.float32), d.init())
  np.testing.assert_allclose(lam1, plain1, rtol=F32_RTOL)  # no previous losses: plain
  lam2, state = d.update(jnp.asarray(g1, jnp.float32), state)
  expected = np.exp(0.5 * g0 + 0.5 * (2 * g1 - g0))
  np.testing.assert_allclose(lam2, expected / expected.sum(), rtol=F32_RTOL)
  np.testing.assert_array_equal(state.prev_losses_K, g1)
  assert int(state.count) == 2


def test_the_plain_state_keeps_its_checkpointed_structure():
  """Games restored from checkpoints rebuild DualState(log_lam_K, count)."""
  state = dual.mirror_ascent(0.1, uncertainty.simplex(2)).init()
  assert type(state) is dual.DualState and state._fields == ("log_lam_K", "count")
