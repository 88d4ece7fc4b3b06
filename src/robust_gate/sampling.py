"""Token-by-token sampling from experts, the gated model, and the student (docs/math.md §2.1, §5).

One mechanism: `sample(next_fn, key, ...)` takes any pure function
`next_fn(inputs_BxT) -> [B, T, V]` of next-token log-distributions (causal:
position t depends on inputs ≤ t only) and fills a sequence after BOS, one token
per step (a `fori_loop` over the static length; wrap it in `jax.jit`). `lm_next_fn`
and `gated_next_fn` build
`next_fn` for a transformer and for the causal gated mixture of experts.
Sampling stops at EOS (token 0); what follows is padding with mask False.
`expert_samples` draws a sample of every expert as one `DomainData`, the Monte Carlo
sample of a sequence-level gate's normalizer (docs/math.md §2.2).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import gating, hf, models
from robust_gate.checks import InputError
from robust_gate.data import DomainData


def adjust(logp_BxV: jax.Array, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """Log-distribution after temperature and top-k; renormalized, [B, V]."""
  if not temperature > 0:
    raise InputError(f"temperature must be > 0, got {temperature}.")
  if top_k < 0 or top_k > logp_BxV.shape[-1]:
    raise InputError(f"top_k must be in [0, {logp_BxV.shape[-1]}], got {top_k}.")
  logits = logp_BxV / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def sample(
  next_fn: Callable,
  key: jax.Array,
  batch_size: int,
  max_len: int,
  temperature: float = 1.0,
  top_k: int = 0,
):
  """Samples `batch_size` sequences; returns (tokens_BxT, mask_BxT).

  tokens_BxT are the targets (x_1 .. x_n, EOS, 0 ...), mask_BxT marks them.
  """

  def body(t, carry):
    inputs, targets, done = carry
    logp = adjust(jax.lax.dynamic_index_in_dim(next_fn(inputs), t, 1, False), temperature, top_k)
    tok = jax.random.categorical(jax.random.fold_in(key, t), logp).astype(jnp.int32)
    tok = jnp.where(done, 0, tok)
    targets = jax.lax.dynamic_update_slice(targets, tok[:, None], (0, t))
    # The input at t + 1 is the target at t. At the last step the index clamps to T − 1,
    # an input no later step reads.
    inputs = jax.lax.dynamic_update_slice(inputs, tok[:, None], (0, t + 1))
    return inputs, targets, done | (tok == 0)

  inputs = jnp.zeros((batch_size, max_len), jnp.int32)
  carry = (inputs, inputs, jnp.zeros((batch_size,), bool))
  # A loop, not unrolled: one copy of the model in the program whatever T (compiling T
  # copies took seconds per T = 8 already).
  _, targets, _ = jax.lax.fori_loop(0, max_len, body, carry)
  first_eos = jnp.argmax(targets == 0, axis=1)
  has_eos = jnp.any(targets == 0, axis=1)
  length = jnp.where(has_eos, first_eos + 1, max_len)
  mask = jnp.arange(max_len)[None, :] < length[:, None]
  return jnp.where(mask, targets, 0), mask


def lm_next_fn(config: models.LMConfig, params) -> Callable:
  return lambda inputs: models.next_token_logprobs(config, params, inputs)


def gated_next_fn(
  lm_cfg: models.LMConfig, expert_params_M, gate_cfg: models.GateConfig, gate_params
) -> Callable:
  """The causal gated mixture: experts' distributions, gate from prefix likelihoods."""

  def experts_next_fn(inputs_BxT):
    logp_MxBxTxV = jax.vmap(models.next_token_logprobs, in_axes=(None, 0, None))(
      lm_cfg, expert_params_M, inputs_BxT
    )
    return jnp.moveaxis(logp_MxBxTxV, 0, 2)

  return mixture_next_fn(experts_next_fn, gate_cfg, gate_params)


def checkpoint_gated_next_fn(
  checkpoints: Sequence[Any], gate_cfg: models.GateConfig, gate_params
) -> Callable:
  """The causal gated mixture over checkpoint experts (robust_gate.hf Models, in the
  gate's expert order), to sample token by token with `sample`."""

  def experts_next_fn(inputs_BxT):
    return jnp.stack([hf.next_token_logprobs(m, inputs_BxT) for m in checkpoints], axis=2)

  return mixture_next_fn(experts_next_fn, gate_cfg, gate_params)


def mixture_next_fn(experts_next_fn: Callable, gate_cfg: models.GateConfig, gate_params):
  """The causal gated mixture of any experts, given their next-token log-distributions
  `experts_next_fn(inputs_BxT) -> [B, T, M, V]`: the gate reads the prefix likelihoods
  of the inputs, which are the targets shifted by one."""

  def next_fn(inputs_BxT):
    logp_BxTxMxV = experts_next_fn(inputs_BxT)
    # The token after position t is inputs[t + 1]; the last position has none yet.
    nxt = jnp.concatenate([inputs_BxT[:, 1:], jnp.zeros_like(inputs_BxT[:, :1])], 1)
    observed = jnp.take_along_axis(logp_BxTxMxV, nxt[:, :, None, None], -1)[..., 0]
    prefix = models.prefix_loglik(observed, jnp.ones(inputs_BxT.shape, bool))
    log_gate = models.gate_log_weights(gate_cfg, gate_params, inputs_BxT, prefix)
    return gating.causal_mixture_next_token(log_gate, logp_BxTxMxV)

  return next_fn


def expert_samples(
  config: models.LMConfig,
  params_M,
  names,
  key: jax.Array,
  num_per_expert: int,
  batch_size: int = 512,
) -> DomainData:
  """`num_per_expert` sequences from each of the stacked experts, independent draws at
  temperature 1, as one DomainData whose "domain" is the expert that drew the sequence
  (rows j·S … j·S + S − 1 are expert j's, in order).

  Inputs are the targets shifted right after BOS, the layout of `data.encode`; a draw that
  reaches the context's end without EOS keeps mask True throughout (its last target is a
  token), and one whose first token is EOS is the empty sequence.
  """
  if num_per_expert < 1 or batch_size < 1:
    raise InputError(f"need num_per_expert, batch_size ≥ 1, got {num_per_expert}, {batch_size}.")
  targets, masks = [], []
  for j in range(len(names)):
    params = jax.tree_util.tree_map(lambda a, j=j: a[j], params_M)
    # Whole batches, one compiled shape for every call; the last one's surplus is dropped.
    for b in range(-(-num_per_expert // batch_size)):
      batch_key = jax.random.fold_in(jax.random.fold_in(key, j), b)
      tokens, mask = _lm_sample(config, params, batch_key, batch_size)
      take = min(batch_size, num_per_expert - b * batch_size)
      targets.append(np.asarray(tokens)[:take])
      masks.append(np.asarray(mask)[:take])
  targets_NxT = np.concatenate(targets).astype(np.int32)
  inputs_NxT = np.concatenate([np.zeros_like(targets_NxT[:, :1]), targets_NxT[:, :-1]], axis=1)
  return DomainData(
    inputs_NxT=inputs_NxT,
    targets_NxT=targets_NxT,
    mask_NxT=np.concatenate(masks),
    domain_N=np.repeat(np.arange(len(names), dtype=np.int32), num_per_expert),
    domains=tuple(names),
    vocab_size=config.vocab_size,
  )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _lm_sample(config: models.LMConfig, params, key: jax.Array, batch_size: int):
  """`sample` from one transformer, compiled once per architecture and batch size."""
  return sample(lm_next_fn(config, params), key, batch_size, config.max_len)
