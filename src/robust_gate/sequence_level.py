"""Sequence-level gates on sequence data (docs/math.md §2.2).

A network reads a whole sequence x and gives scores s_w(x) ∈ R^M; the model is

    p_w(x) = Σ_j softmax(s_w(x))_j · p_j(x) / Z_w,   Z_w = Σ_j E_{x~p_j}[softmax(s_w(x))_j],

the general gate of G_1 (the causal gates of §2.1 are the special case that the experts'
conditionals can be mixed token by token). What the network reads of x (`Features`) is
every expert's log-likelihood log p_j(x) (the sum of its cached token log-probabilities)
and x's length. A sequence that does not end within the context (no EOS among its T
targets) holds no data, but an expert can sample one: it gets the constant gate 1/M, so
the model is defined on every finite sequence and such samples still count in Z_w.

Z_w has no closed form here. It is estimated from samples of the experts
(`gating.mc_normalizer`): during training from one fixed sample, whose Ẑ is an unbiased
estimate of Z_w with an unbiased gradient (`loss_fn`); at evaluation from a fresh sample,
independent of the fitted w, with the bias and uncertainty of log Ẑ reported
(`gating.log_normalizer`), since the fitted w can lower Ẑ on the sample it was fitted
with more than it lowers Z_w.

At initialization the gate is the constant 1/M: p_w is the uniform mixture of the experts
with Z_w = 1, the model the causal gate network starts from too (§2.1, §2.3).
"""

import dataclasses
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from robust_gate import data as data_lib
from robust_gate import gating, parallel
from robust_gate.primal_dual import LossFn

# Relative log-likelihoods below this are one feature value (as the causal gate's, §2.1).
_FLOOR = -30.0
# Stands in for log p_j(x) = −inf in the features (an expert without mass on x).
_IMPOSSIBLE = -1e4


@dataclasses.dataclass(frozen=True)
class SequenceGateConfig:
  num_experts: int
  max_len: int  # T: the context, to scale the length feature
  hidden: int = 32


@struct.dataclass
class Features:
  """What a sequence-level gate reads of N sequences (or [M, S] of them: a sample per
  expert, as `gating.mc_normalizer` takes it)."""

  loglik_NxM: jax.Array  # log p_j(x) of every expert, nats
  tokens_N: jax.Array  # real targets (EOS included), float
  complete_N: jax.Array  # bool: x ends (EOS) within the context


def features(cache_NxTxM, mask_NxT, targets_NxT) -> Features:
  """The features of sequences from their cached token log-probabilities (§2.1's cache)."""
  mask_NxT = jnp.asarray(mask_NxT)
  return Features(
    loglik_NxM=jnp.sum(jnp.where(mask_NxT[..., None], jnp.asarray(cache_NxTxM), 0.0), axis=1),
    tokens_N=jnp.sum(mask_NxT, axis=1).astype(jnp.float32),
    complete_N=jnp.any(mask_NxT & (jnp.asarray(targets_NxT) == 0), axis=1),
  )


class SequenceGate(nn.Module):
  """log softmax(s_w(x)) from the experts' log-likelihoods of x and its length.

  s_w(x)_j = a · r_j + h_w(features)_j with r_j = max(log p_j(x) − max_i log p_i(x), −30):
  `posterior_scale` a and the MLP's output layer start at 0 (the constant gate); a = 1 with
  h = 0 is the sequence-level posterior gate, which is not the mixture D_λ (§2.3).
  """

  config: SequenceGateConfig

  @nn.compact
  def __call__(self, loglik_NxM, tokens_N):
    c = self.config
    loglik_NxM = jnp.where(jnp.isfinite(loglik_NxM), loglik_NxM, _IMPOSSIBLE)
    rel_NxM = jnp.maximum(loglik_NxM - jnp.max(loglik_NxM, -1, keepdims=True), _FLOOR)
    per_token_NxM = jnp.maximum(loglik_NxM / tokens_N[:, None], _FLOOR)
    feats = [rel_NxM / 10.0, per_token_NxM / 10.0, (tokens_N / c.max_len)[:, None]]
    h = nn.gelu(nn.Dense(c.hidden)(jnp.concatenate(feats, axis=-1)))
    correction_NxM = nn.Dense(c.num_experts, kernel_init=nn.initializers.zeros)(h)
    scale = self.param("posterior_scale", nn.initializers.zeros, ())
    return jax.nn.log_softmax(scale * rel_NxM + correction_NxM, axis=-1)


def init_gate(cfg: SequenceGateConfig, key: jax.Array):
  """Parameters of a SequenceGate: the constant gate 1/M (§2.2)."""
  return SequenceGate(cfg).init(key, jnp.zeros((1, cfg.num_experts)), jnp.ones((1,)))


def log_weights(cfg: SequenceGateConfig, params, f: Features) -> jax.Array:
  """log softmax(s_w(x)) of every sequence, [N, M]; log 1/M for those that do not end (§2.2)."""
  log_gate_NxM = cast(jax.Array, SequenceGate(cfg).apply(params, f.loglik_NxM, f.tokens_N))
  uniform = -jnp.log(float(cfg.num_experts))
  return jnp.where(f.complete_N[:, None], log_gate_NxM, uniform)


def normalizer(cfg: SequenceGateConfig, params, samples: Features) -> gating.NormalizerEstimate:
  """Ẑ_w from `samples` with leading axes [M, S] (row j drawn from expert j), §2.2."""
  return gating.mc_normalizer(lambda p, f: log_weights(cfg, p, f), params, samples)


def sequence_logp(cfg: SequenceGateConfig, params, f: Features, log_z) -> jax.Array:
  """log p_w(x) = log Σ_j softmax(s_w(x))_j p_j(x) − log Z_w, [N] (§2.2)."""
  return gating.sequence_mixture_logp(log_weights(cfg, params, f), f.loglik_NxM, log_z)


def loss_fn(
  cfg: SequenceGateConfig,
  d: data_lib.DomainData,
  cache_NxTxM,
  baseline_K,
  samples: Features,
  per_domain: int,
) -> LossFn:
  """Per-domain losses L_k = Σ −log p_w(x) / Σ tokens − b_k on a stratified batch of `d`
  (nats per token, §3), with log Z_w estimated on `samples` ([M, S], fixed) at every step.

  The gradient includes −∇ log Ẑ_w: Ẑ is linear in the gate's weights and the samples do
  not depend on w, so ∇Ẑ is unbiased for ∇Z_w (§2.2).
  """
  f_all = features(cache_NxTxM, d.mask_NxT, d.targets_NxT)
  samples = jax.tree_util.tree_map(jnp.asarray, samples)
  index, baseline_K = data_lib.domain_index(d), jnp.asarray(baseline_K, jnp.float32)
  parallel.check_divisible(per_domain, "per_domain (sequence-level gate)")

  def fn(params, batch, key):
    del batch
    idx_KxB = data_lib.stratified_batch(key, index, per_domain)
    K, B = idx_KxB.shape
    flat = parallel.shard_batch(idx_KxB.reshape(-1))
    f = jax.tree_util.tree_map(lambda a: a[flat], f_all)
    log_z = normalizer(cfg, params, samples).log_z
    nll_KxB = -sequence_logp(cfg, params, f, log_z).reshape(K, B)
    return nll_KxB.sum(1) / f.tokens_N.reshape(K, B).sum(1) - baseline_K

  return fn
