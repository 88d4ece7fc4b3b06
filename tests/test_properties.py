"""Property tests (hypothesis): any valid input gives finite, normalized results.

Projections and the dual transform have theirs in test_uncertainty.py / test_dual.py.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import F32_RTOL

from robust_gate import gating, objectives, train

scores = st.floats(-30, 30, width=32)


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (2, 3, 4), elements=scores),
  hnp.arrays(np.float32, (2, 3, 4, 5), elements=scores),
  hnp.arrays(np.bool_, (4, 5)),
)
def test_causal_mixture_is_a_distribution_for_any_gate_and_experts(gate, logits, dead):
  # Any gate on Δ_M; any experts, some giving some tokens no mass (never all of them).
  dead[:, 0] = False
  log_gate = jax.nn.log_softmax(jnp.asarray(gate))
  logp = jax.nn.log_softmax(jnp.where(dead, -jnp.inf, jnp.asarray(logits)))
  out = gating.causal_mixture_next_token(log_gate, logp)
  total = jnp.exp(out).sum(-1)
  assert np.all(np.isfinite(total))
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  assert not np.any(np.isnan(out))


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (6, 3), elements=scores), hnp.arrays(np.float32, (3, 6), elements=scores)
)
def test_sequence_gate_normalized_by_exact_z_sums_to_one(gate, logits):
  log_gate = jax.nn.log_softmax(jnp.asarray(gate))
  expert = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)  # M distributions on N
  logp = gating.finite_sequence_logp(log_gate, expert)
  np.testing.assert_allclose(jnp.exp(logp).sum(), 1.0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (8,), elements=st.floats(0, 50, width=32)),
  hnp.arrays(np.int32, (8,), elements=st.integers(0, 2)),
  hnp.arrays(np.float32, (3,), elements=st.floats(-5, 5, width=32)),
)
def test_domain_losses_are_finite_and_exact_group_means(nll, domain, baseline):
  losses, weight = objectives.domain_losses(
    jnp.asarray(nll), jnp.asarray(domain), 3, jnp.asarray(baseline)
  )
  assert np.all(np.isfinite(losses))
  for k in range(3):
    rows = domain == k
    expected = nll[rows].mean() - baseline[k] if rows.any() else 0.0
    np.testing.assert_allclose(losses[k], expected, rtol=1e-5, atol=1e-4)
    assert weight[k] == rows.sum()


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (3, 2, 4), elements=st.floats(0, 50, width=32)),
  hnp.arrays(np.bool_, (3, 2, 4)),
  hnp.arrays(np.float32, (3,), elements=st.floats(-5, 5, width=32)),
)
def test_token_losses_are_exact_token_means_whenever_each_domain_has_a_token(nll, mask, baseline):
  mask[:, 0, 0] = True
  losses = train.per_domain_token_loss(jnp.asarray(nll), jnp.asarray(mask), jnp.asarray(baseline))
  # Σ NLL over the domain's tokens / their number − b_k, in float64.
  nll64 = np.where(mask, nll.astype(np.float64), 0.0)
  expected = nll64.sum(axis=(1, 2)) / mask.sum(axis=(1, 2)) - baseline
  np.testing.assert_allclose(losses, expected, rtol=F32_RTOL, atol=1e-5)
