"""Objectives: per-domain losses, baselines, the linearized and mixture KL (docs/math.md §3).

Losses are in nats per token (or per point on a finite space); `nats_to_bits`
converts for reports. Zero-probability terms follow 0·log 0 = 0 and have zero
(not NaN) gradients.
"""

import math

import chex
import jax
import jax.numpy as jnp

BASELINES = ("entropy", "expert", "none")


def nats_to_bits(x):
  return x / math.log(2.0)


def _safe_log(logq_N, mask):
  """logq where mask, 0 elsewhere, with a zero gradient off the mask."""
  return jnp.where(mask, logq_N, 0.0)


def entropy(probs_KxN: jax.Array) -> jax.Array:
  """H(D_k) = −Σ_x D_k(x) log D_k(x), shape [K]."""
  chex.assert_rank(probs_KxN, 2)
  pos = probs_KxN > 0
  return -jnp.sum(probs_KxN * jnp.log(jnp.where(pos, probs_KxN, 1.0)), axis=-1)


def cross_entropy(probs_KxN: jax.Array, logq_N: jax.Array) -> jax.Array:
  """CE(D_k, q) = −Σ_x D_k(x) log q(x), shape [K] (inf if q misses D_k's mass)."""
  chex.assert_rank(probs_KxN, 2)
  chex.assert_type([probs_KxN, logq_N], float)
  chex.assert_shape(logq_N, (probs_KxN.shape[1],))
  pos_KxN = probs_KxN > 0
  return -jnp.sum(probs_KxN * _safe_log(logq_N[None, :], pos_KxN), axis=-1)


def kl(probs_KxN: jax.Array, logq_N: jax.Array) -> jax.Array:
  """KL(D_k ‖ q) for every row k, shape [K]."""
  return cross_entropy(probs_KxN, logq_N) - entropy(probs_KxN)


def mixture_kl(lam_K: jax.Array, probs_KxN: jax.Array, logq_N: jax.Array) -> jax.Array:
  """KL(D_λ ‖ q) with D_λ = Σ_k λ_k D_k: the exact mixture objective (§3)."""
  chex.assert_shape(lam_K, (probs_KxN.shape[0],))
  return kl((lam_K @ probs_KxN)[None, :], logq_N)[0]


def jsd(lam_K: jax.Array, probs_KxN: jax.Array) -> jax.Array:
  """λ-weighted Jensen-Shannon divergence H(D_λ) − Σ_k λ_k H(D_k) (§3)."""
  chex.assert_shape(lam_K, (probs_KxN.shape[0],))
  return entropy((lam_K @ probs_KxN)[None, :])[0] - lam_K @ entropy(probs_KxN)


def linearized_objective(lam_K: jax.Array, losses_K: jax.Array) -> jax.Array:
  """F(w, λ) = Σ_k λ_k L_k(w) (§3)."""
  chex.assert_equal_shape([lam_K, losses_K])
  return jnp.dot(lam_K, losses_K)


def finite_baselines(kind: str, probs_KxN: jax.Array, expert_logprobs_MxN: jax.Array) -> jax.Array:
  """The baselines b_k of §3 on a finite space.

  Args:
    kind: "entropy" (b_k = H(D_k): L_k is the exact KL), "expert"
      (b_k = CE(D_k, p_k), expert k's loss on its own domain; needs M ≥ K and
      expert k trained for domain k), or "none" (b_k = 0).
    probs_KxN: the domains.
    expert_logprobs_MxN: the experts.

  Returns:
    b, shape [K].
  """
  K = probs_KxN.shape[0]
  if kind == "entropy":
    return entropy(probs_KxN)
  if kind == "expert":
    if expert_logprobs_MxN.shape[0] < K:
      raise ValueError(
        f"baseline 'expert' pairs domain k with expert k, but there are "
        f"{expert_logprobs_MxN.shape[0]} experts for {K} domains."
      )
    return jnp.stack(
      [cross_entropy(probs_KxN[k : k + 1], expert_logprobs_MxN[k])[0] for k in range(K)]
    )
  if kind == "none":
    return jnp.zeros(K)
  raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}.")


def domain_losses(
  nll_B: jax.Array,
  domain_B: jax.Array,
  num_domains: int,
  baseline_K: jax.Array,
  weight_B: jax.Array | None = None,
):
  """Per-domain mean loss L̂_k = mean_{i in k} nll_i − b_k, with explicit counts.

  Args:
    nll_B: per-example loss (e.g. mean token NLL of a sequence).
    domain_B: int domain index of each example.
    num_domains: K.
    baseline_K: b_k.
    weight_B: optional per-example weights (e.g. token counts); default 1.

  Returns:
    (losses_K, weight_K): a domain without examples in the batch gets loss 0
    and weight 0 (the caller decides what an empty domain means).
  """
  chex.assert_rank([nll_B, domain_B], 1)
  chex.assert_equal_shape([nll_B, domain_B])
  chex.assert_type([nll_B, domain_B], [float, int])
  weight_B = jnp.ones_like(nll_B) if weight_B is None else weight_B
  onehot_BxK = jax.nn.one_hot(domain_B, num_domains, dtype=nll_B.dtype)
  weight_K = weight_B @ onehot_BxK
  total_K = (weight_B * nll_B) @ onehot_BxK
  mean_K = total_K / jnp.maximum(weight_K, 1e-30)
  return jnp.where(weight_K > 0, mean_K - baseline_K, 0.0), weight_K
