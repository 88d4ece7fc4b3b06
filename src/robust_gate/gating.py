"""Gates and normalization: the space G_1 (docs/math.md §2).

Two families of normalized gated models, all in log space:

* causal (token-level) gates, normalized by construction:
      log p_w(x_t|x_<t) = logsumexp_j( log π_w(x_<t)_j + log p_j(x_t|x_<t) );
* sequence-level gates g_w(x, j) = softmax(s_w(x))_j / Z_w with
      Z_w = Σ_j E_{x~p_j}[softmax(s_w(x))_j],
  exact on a finite space, Monte Carlo from the experts' samples otherwise
  (`mc_normalizer`; `log_normalizer` corrects log Ẑ's bias and gives its interval).

`-inf` expert log-probabilities (an expert without mass there) are legal: they
contribute nothing and have zero gradient.
"""

import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np


def causal_mixture_logp(log_gate_BxTxM: jax.Array, logp_BxTxM: jax.Array) -> jax.Array:
  """Log-probability of the observed tokens under a causal mixture (§2.1).

  Args:
    log_gate_BxTxM: log π_w(x_<t), log-softmax over the M experts.
    logp_BxTxM: log p_j(x_t | x_<t) of each expert for the observed token.

  Returns:
    log p_w(x_t | x_<t), shape [B, T].
  """
  chex.assert_rank(logp_BxTxM, 3)
  chex.assert_equal_shape([log_gate_BxTxM, logp_BxTxM])
  chex.assert_type([log_gate_BxTxM, logp_BxTxM], float)
  return jax.nn.logsumexp(log_gate_BxTxM + logp_BxTxM, axis=-1)


def causal_mixture_next_token(log_gate_BxTxM: jax.Array, logp_BxTxMxV: jax.Array) -> jax.Array:
  """Full next-token log-distribution of a causal mixture (§2.1), [B, T, V]."""
  chex.assert_rank(logp_BxTxMxV, 4)
  chex.assert_equal_shape_prefix([log_gate_BxTxM, logp_BxTxMxV], 3)
  chex.assert_type([log_gate_BxTxM, logp_BxTxMxV], float)
  return jax.nn.logsumexp(log_gate_BxTxM[..., None] + logp_BxTxMxV, axis=-2)


def posterior_log_gate(log_prior_M: jax.Array, logp_NxM: jax.Array) -> jax.Array:
  """The Bayes-posterior gate log π(x)_j = log softmax(log λ_j + log p_j(x)) (§2.3).

  For a causal gate pass the experts' log-probabilities of the prefix x_<t:
  with exact experts (p_j = D_j) the causal mixture is then exactly D_λ. (For a
  sequence-level gate the model reproducing D_λ is the constant gate
  softmax(s(x)) = λ, not this one; §2.3 too.)
  """
  chex.assert_rank(logp_NxM, 2)
  chex.assert_shape(log_prior_M, (logp_NxM.shape[1],))
  chex.assert_type([log_prior_M, logp_NxM], float)
  return jax.nn.log_softmax(log_prior_M[None] + logp_NxM, axis=-1)


def exact_log_normalizer(log_gate_NxM: jax.Array, expert_logprobs_MxN: jax.Array) -> jax.Array:
  """log Z_w = log Σ_x Σ_j p_j(x) softmax(s_w(x))_j on a finite space (§2.2)."""
  chex.assert_rank(log_gate_NxM, 2)
  chex.assert_shape(expert_logprobs_MxN, log_gate_NxM.shape[::-1])
  chex.assert_type([log_gate_NxM, expert_logprobs_MxN], float)
  return jax.nn.logsumexp(log_gate_NxM + expert_logprobs_MxN.T)


def sequence_mixture_logp(
  log_gate_BxM: jax.Array, logp_BxM: jax.Array, log_z: jax.Array
) -> jax.Array:
  """log p_w(x) = log Σ_j softmax(s_w(x))_j p_j(x) − log Z_w (§2.2), shape [B]."""
  chex.assert_rank(logp_BxM, 2)
  chex.assert_equal_shape([log_gate_BxM, logp_BxM])
  chex.assert_rank(log_z, 0)
  chex.assert_type([log_gate_BxM, logp_BxM], float)
  return jax.nn.logsumexp(log_gate_BxM + logp_BxM, axis=-1) - log_z


def finite_sequence_logp(log_gate_NxM: jax.Array, expert_logprobs_MxN: jax.Array) -> jax.Array:
  """log p_w over a whole finite space, exactly normalized; shape [N]."""
  chex.assert_rank(log_gate_NxM, 2)
  chex.assert_shape(expert_logprobs_MxN, log_gate_NxM.shape[::-1])
  chex.assert_type([log_gate_NxM, expert_logprobs_MxN], float)
  log_c_N = jax.nn.logsumexp(log_gate_NxM + expert_logprobs_MxN.T, axis=-1)
  return log_c_N - jax.nn.logsumexp(log_c_N)


class NormalizerEstimate(NamedTuple):
  """Monte Carlo estimate of Z_w and its standard error (§2.2)."""

  z: jax.Array
  stderr: jax.Array

  @property
  def log_z(self) -> jax.Array:
    return jnp.log(self.z)


def mc_normalizer(
  log_gate_fn: Callable[[Any, Any], jax.Array], params: Any, samples_by_expert: Any
) -> NormalizerEstimate:
  """Z_w ≈ Σ_j (1/S) Σ_i softmax(s_w(x_ji))_j with x_ji ~ p_j (§2.2).

  Differentiable in `params`: the samples do not depend on w, so the gradient
  of the estimate is the Monte Carlo estimate of ∇Z_w.

  Args:
    log_gate_fn: (params, x_S) -> log-softmax gate, shape [S, M].
    params: gate parameters.
    samples_by_expert: pytree whose leaves have leading axes [M, S]; row j
      holds S independent samples of expert j.

  Returns:
    NormalizerEstimate(z, stderr), stderr = sqrt(Σ_j Var_j / S).
  """
  leaves = jax.tree_util.tree_leaves(samples_by_expert)
  num_experts, num_samples = leaves[0].shape[:2]
  chex.assert_tree_shape_prefix(samples_by_expert, (num_experts, num_samples))

  def own_weight(j, x_S):
    log_gate_SxM = log_gate_fn(params, x_S)
    chex.assert_shape(log_gate_SxM, (num_samples, num_experts))
    return jnp.exp(log_gate_SxM[:, j])

  weights_MxS = jax.vmap(own_weight)(jnp.arange(num_experts), samples_by_expert)
  z = jnp.sum(jnp.mean(weights_MxS, axis=1))
  var_M = (
    jnp.var(weights_MxS, axis=1, ddof=1) if num_samples > 1 else jnp.full((num_experts,), jnp.inf)
  )
  return NormalizerEstimate(z=z, stderr=jnp.sqrt(jnp.sum(var_M) / num_samples))


class LogNormalizer(NamedTuple):
  """log Z_w from an estimate Ẑ of an independent sample (§2.2), float64 numbers.

  `log_z` is log Ẑ corrected for its Jensen bias to second order; `stderr` is the
  delta-method standard error of log Ẑ; [low, high] the normal interval around `log_z`.
  """

  log_z: float
  log_z_uncorrected: float
  stderr: float
  low: float
  high: float
  level: float


def log_normalizer(estimate: NormalizerEstimate, level: float = 0.95) -> LogNormalizer:
  """log Z_w with its bias corrected and its uncertainty, from Ẑ = `estimate` (§2.2).

  By the delta method, with σ = stderr(Ẑ)/Ẑ, log Ẑ has standard error σ and
  E[log Ẑ] ≈ log Z − σ²/2 (Jensen: log is concave, so log Ẑ is biased low, which
  would make a loss divided by Ẑ look better); `log_z` adds σ²/2 back. Valid for a
  sample independent of the gate's parameters (not the one it was fitted with).
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}.")
  z, stderr = float(estimate.z), float(estimate.stderr)
  if not (z > 0 and np.isfinite(stderr)):
    raise ValueError(f"need Ẑ > 0 and a finite standard error, got {z} ± {stderr}.")
  sigma = stderr / z
  log_z = float(np.log(z)) + 0.5 * sigma**2
  half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * sigma
  return LogNormalizer(log_z, float(np.log(z)), sigma, log_z - half, log_z + half, level)
