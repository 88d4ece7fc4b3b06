import cvxpy as cp
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from tolerances import F32_RTOL

from robust_gate import uncertainty
from robust_gate.checks import InputError

log_vectors = st.integers(2, 6).flatmap(
  lambda k: hnp.arrays(np.float64, k, elements=st.floats(-30, 30, allow_nan=False))
)


def random_box(rng, K):
  lo = rng.uniform(0, 1.0 / K, size=K)
  hi = np.minimum(lo + rng.uniform(0, 2.0 / K, size=K), 1.0)
  hi[rng.integers(K)] = 1.0  # guarantees Σ hi ≥ 1
  return uncertainty.box(lo, hi)


def sets_for(K, seed):
  rng = np.random.default_rng(seed)
  prior = rng.dirichlet(np.ones(K))
  return [
    uncertainty.simplex(K),
    random_box(rng, K),
    uncertainty.kl_ball(prior, float(rng.uniform(0.01, 0.5))),
  ]


# One program per kind of set and K (the sets are pytrees), not one dispatch per operation.
_project_log = jax.jit(lambda s, log_q_K: s.project_log(log_q_K))


@settings(max_examples=60, deadline=None)
@given(log_vectors, st.integers(0, 10_000))
def test_projections_land_in_their_sets(log_q, seed):
  for s in sets_for(len(log_q), seed):
    lam = np.exp(np.asarray(_project_log(s, jnp.asarray(log_q, jnp.float32))))
    assert np.all(np.isfinite(lam))
    assert s.contains(lam, atol=1e-4), (s.kind, lam)


@pytest.mark.parametrize("kind", ["box", "kl_ball"])
def test_projection_is_the_kl_projection(kind):
  """Compare with a convex solver's argmin_{λ∈Λ} KL(λ ‖ q)."""
  rng = np.random.default_rng(3)
  for trial in range(5):
    K = 4
    s = sets_for(K, trial)[1 if kind == "box" else 2]
    q = rng.dirichlet(np.ones(K) * 0.5)
    lam = np.exp(np.asarray(s.project_log(jnp.log(jnp.asarray(q, jnp.float32)))))
    x = cp.Variable(K, nonneg=True)
    cons = [cp.sum(x) == 1]
    if kind == "box":
      cons += [x >= np.asarray(s.lo_K), x <= np.asarray(s.hi_K)]
    else:
      cons += [cp.sum(cp.kl_div(x, np.asarray(s.prior_K, np.float64))) <= float(s.radius)]
    cp.Problem(cp.Minimize(cp.sum(cp.kl_div(x, q))), cons).solve()
    np.testing.assert_allclose(lam, x.value, atol=2e-4)


def test_simplex_projection_is_normalization():
  s = uncertainty.simplex(3)
  log_q = jnp.log(jnp.array([1.0, 2.0, 5.0]))
  np.testing.assert_allclose(np.exp(s.project_log(log_q)), [0.125, 0.25, 0.625], rtol=F32_RTOL)


def test_max_linear_matches_linear_programming():
  rng = np.random.default_rng(0)
  for K in (2, 3, 5):
    for trial in range(4):
      c = rng.normal(size=K)
      simplex, box, ball = sets_for(K, 10 * K + trial)
      v, lam = simplex.max_linear(jnp.asarray(c, jnp.float32))
      np.testing.assert_allclose(v, c.max(), rtol=F32_RTOL)
      v, lam = box.max_linear(jnp.asarray(c, jnp.float32))
      res = linprog(
        -c,
        A_eq=np.ones((1, K)),
        b_eq=[1],
        bounds=list(zip(np.asarray(box.lo_K), np.asarray(box.hi_K))),
      )
      np.testing.assert_allclose(v, -res.fun, atol=1e-5)
      assert box.contains(lam)
      v, lam = ball.max_linear(jnp.asarray(c, jnp.float32))
      x = cp.Variable(K, nonneg=True)
      prob = cp.Problem(
        cp.Maximize(c @ x),
        [
          cp.sum(x) == 1,
          cp.sum(cp.kl_div(x, np.asarray(ball.prior_K, np.float64))) <= float(ball.radius),
        ],
      )
      prob.solve()
      np.testing.assert_allclose(v, prob.value, atol=2e-4)
      assert ball.contains(lam, atol=1e-4)


def test_box_vertices_are_extreme_points():
  s = uncertainty.box([0.1, 0.2, 0.0], [0.5, 0.6, 0.7])
  V = s.vertices()
  for v in V:
    assert s.contains(v)
  # By hand: two coordinates at a bound, the third 1 − their sum within its bounds.
  # (The bounds are float32, so a vertex may appear more than once, 1e-8 apart.)
  want = np.array([[0.1, 0.2, 0.7], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.5, 0.5, 0], [0.4, 0.6, 0]])
  dist = np.abs(V[:, None] - want[None]).max(-1)
  assert np.all(dist.min(axis=1) < 1e-6), V  # every row is one of them
  assert np.all(dist.min(axis=0) < 1e-6), V  # and each of them is found
  # Any linear maximum over Λ is attained at a vertex.
  rng = np.random.default_rng(0)
  for _ in range(10):
    c = rng.normal(size=3)
    np.testing.assert_allclose(
      (V @ c).max(), s.max_linear(jnp.asarray(c, jnp.float32))[0], atol=1e-6
    )


def test_sets_are_jittable_pytrees():
  s = uncertainty.box([0.1, 0.1], [0.9, 0.9])
  f = jax.jit(lambda s, x: s.project_log(x))
  out = f(s, jnp.array([0.0, 5.0]))
  np.testing.assert_allclose(np.exp(out), [0.1, 0.9], atol=1e-6)


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: uncertainty.simplex(0), "K must be ≥ 1"),
    (lambda: uncertainty.simplex(2.5), "must be an int"),
    (lambda: uncertainty.box([0.6, 0.6], [1.0, 1.0]), "admits no mixture"),
    (lambda: uncertainty.box([0.0, 0.0], [0.3, 0.3]), "admits no mixture"),
    (lambda: uncertainty.box([0.5, 0.2], [0.4, 0.9]), "empty"),
    (lambda: uncertainty.box([-0.1, 0.2], [0.4, 0.9]), "inside the simplex"),
    (lambda: uncertainty.box([0.1, np.nan], [0.4, 0.9]), "NaN"),
    (lambda: uncertainty.box([0.1], [0.4, 0.9]), "shape"),
    (lambda: uncertainty.kl_ball([0.5, 0.6], 0.1), "point of the simplex"),
    (lambda: uncertainty.kl_ball([0.5, 0.5], -1.0), "radius"),
    (lambda: uncertainty.kl_ball([], 0.1), "non-empty"),
  ],
)
def test_empty_or_invalid_sets_are_clear_errors(make, match):
  with pytest.raises(InputError, match=match):
    make()
