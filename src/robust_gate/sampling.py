"""Token-by-token sampling from experts, the gated model, and the student (docs/math.md §2.1, §5).

Two loops that draw the same tokens. `sample(next_fn, key, ...)` takes any pure
function `next_fn(inputs_BxT) -> [B, T, V]` of next-token log-distributions (causal:
position t depends on inputs ≤ t only) and fills a sequence after BOS, one token per
step (a `fori_loop` over the static length; wrap it in `jax.jit`), rerunning
`next_fn` on the whole sequence at every step: O(T²) forward work. `sample_cached`
takes a `Stepper` instead, `init` and `step(state, inputs_B, t)`, which computes
position t alone from a carried state; it draws the same token at every position
(the same key, the same adjustment) from distributions equal up to the order of
float32 sums. Sampling stops at EOS (token 0); what follows is padding with mask
False.

What is cached: the Hugging Face checkpoint experts (`checkpoint_stepper`, and their
gated mixture `checkpoint_gated_stepper`) keep the keys and values of every layer
(robust_gate.hf.decode), so a step runs their layers on one position; the mixture
carries the experts' prefix log-likelihoods as a running sum, and reruns only its
small gate network on the prefix (`mixture_stepper` says why). What is not: the
robust_gate `TransformerLM` (models.py) and its gated mixture have no decode step,
so `lm_next_fn`, `gated_next_fn` and `expert_samples` sample with `sample`, rerunning
the prefix.

Jit a sampler with the parameters (hf Models, stacked experts, the gate's) as
arguments, `jax.jit(lambda ms, g, k: sample_cached(checkpoint_gated_stepper(ms,
cfg, g), k, B, T))(models, gate_params, key)`, rather than closed over: closed-over
arrays are compiled into the program as constants (a checkpoint's every weight), and
a closed-over, freshly initialized gate has given different numbers from one
compilation to the next on the CPU backend (jax 0.10.2); as arguments it did not.

`expert_samples` draws a sample of every expert as one `DomainData`, the Monte Carlo
sample of a sequence-level gate's normalizer (docs/math.md §2.2).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
    logp = jax.lax.dynamic_index_in_dim(next_fn(inputs), t, 1, False)
    tok = _draw(logp, key, t, done, temperature, top_k)
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
  return _finish(targets)


class Stepper(NamedTuple):
  """A model that computes one position at a time, carrying a state (its cache).

  `init(batch_size, max_len) -> state`, the state before position 0;
  `step(state, inputs_B, t) -> (logp_BxV, state)`: given the inputs at position t
  (data ids, BOS = 0 at t = 0) and the state after positions < t, the next-token
  log-distribution at t, as `next_fn(inputs)[:, t]` gives it, and the state after t.
  """

  init: Callable
  step: Callable


def sample_cached(
  stepper: Stepper,
  key: jax.Array,
  batch_size: int,
  max_len: int,
  temperature: float = 1.0,
  top_k: int = 0,
):
  """`sample` with a `Stepper`: the same draws (the same key per position, the same
  adjustment), each position computed once. Returns (tokens_BxT, mask_BxT)."""

  def body(t, carry):
    state, inputs_B, targets, done = carry
    logp_BxV, state = stepper.step(state, inputs_B, t)
    tok = _draw(logp_BxV, key, t, done, temperature, top_k)
    targets = jax.lax.dynamic_update_slice(targets, tok[:, None], (0, t))
    return state, tok, targets, done | (tok == 0)

  zeros_B = jnp.zeros((batch_size,), jnp.int32)  # BOS, the input at position 0
  targets = jnp.zeros((batch_size, max_len), jnp.int32)
  carry = (stepper.init(batch_size, max_len), zeros_B, targets, jnp.zeros((batch_size,), bool))
  _, _, targets, _ = jax.lax.fori_loop(0, max_len, body, carry)
  return _finish(targets)


def step_through(stepper: Stepper, inputs_BxT: jax.Array) -> jax.Array:
  """Every position's next-token log-distribution given the inputs, [B, T, V], by one
  step per position: what `next_fn(inputs_BxT)` gives for the stepper's model (the
  check that a stepper is its model)."""
  B, T = inputs_BxT.shape

  def body(state, t):
    logp_BxV, state = stepper.step(state, inputs_BxT[:, t], t)
    return state, logp_BxV

  _, logp_TxBxV = jax.lax.scan(body, stepper.init(B, T), jnp.arange(T))
  return jnp.moveaxis(logp_TxBxV, 0, 1)


def _draw(logp_BxV, key: jax.Array, t, done_B, temperature: float, top_k: int) -> jax.Array:
  """Position t's tokens [B] int32: drawn from the adjusted distribution with the
  key's t-th fold, 0 (padding) where the sequence has ended."""
  logp_BxV = adjust(logp_BxV, temperature, top_k)
  tok_B = jax.random.categorical(jax.random.fold_in(key, t), logp_BxV).astype(jnp.int32)
  return jnp.where(done_B, 0, tok_B)


def _finish(targets_BxT):
  """(tokens, mask): the mask runs to the first EOS, included; after it, zeros."""
  max_len = targets_BxT.shape[1]
  first_eos = jnp.argmax(targets_BxT == 0, axis=1)
  has_eos = jnp.any(targets_BxT == 0, axis=1)
  length = jnp.where(has_eos, first_eos + 1, max_len)
  mask = jnp.arange(max_len)[None, :] < length[:, None]
  return jnp.where(mask, targets_BxT, 0), mask


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


def checkpoint_stepper(model: hf.Model) -> Stepper:
  """One checkpoint expert as a `Stepper`: its key/value cache (robust_gate.hf.decode)."""
  return Stepper(
    init=lambda batch_size, max_len: hf.init_cache(model, batch_size, max_len),
    step=lambda cache, inputs_B, t: hf.decode_step(model, cache, inputs_B, t),
  )


def checkpoint_gated_stepper(
  checkpoints: Sequence[Any], gate_cfg: models.GateConfig, gate_params
) -> Stepper:
  """`checkpoint_gated_next_fn` as a `Stepper`: each expert with its key/value cache."""

  def init(batch_size, max_len):
    return tuple(hf.init_cache(m, batch_size, max_len) for m in checkpoints)

  def step(caches, inputs_B, t):
    stepped = [hf.decode_step(m, c, inputs_B, t) for m, c in zip(checkpoints, caches)]
    return jnp.stack([logp for logp, _ in stepped], axis=1), tuple(c for _, c in stepped)

  return mixture_stepper(Stepper(init, step), gate_cfg, gate_params)


class _MixtureState(NamedTuple):
  experts: Any  # the experts' stepper's state
  logp_BxMxV: jax.Array  # the experts' distributions at the last position (zeros before 0)
  prefix_BxM: jax.Array  # log p_j(x_<t) at the position being computed
  inputs_BxT: jax.Array  # the inputs so far (zeros after t), for the gate
  prefix_BxTxM: jax.Array  # the prefix log-likelihoods so far, for the gate


def mixture_stepper(experts: Stepper, gate_cfg: models.GateConfig, gate_params) -> Stepper:
  """`mixture_next_fn` as a `Stepper`, over experts given as one whose step gives
  their distributions [B, M, V].

  The experts' prefix log-likelihoods are carried (a running sum: at t, the last
  position's distributions scored at the input that arrives). The gate network is
  small and reads each position's token, prefix and position alone, but takes the
  position from where it sits in its input; so it reruns on the inputs and prefixes
  so far, [B, T], and its row t is taken: O(T) gate work per step, next to the
  experts' O(1) layer work and O(T) attention.
  """

  def init(batch_size, max_len):
    expert_state = experts.init(batch_size, max_len)
    inputs_B = jnp.zeros((batch_size,), jnp.int32)
    logp = jax.eval_shape(experts.step, expert_state, inputs_B, 0)[0]
    M = gate_cfg.num_experts
    return _MixtureState(
      experts=expert_state,
      logp_BxMxV=jnp.zeros(logp.shape, logp.dtype),
      prefix_BxM=jnp.zeros((batch_size, M), logp.dtype),
      inputs_BxT=jnp.zeros((batch_size, max_len), jnp.int32),
      prefix_BxTxM=jnp.zeros((batch_size, max_len, M), jnp.float32),
    )

  def step(state: _MixtureState, inputs_B, t):
    observed_BxM = jnp.take_along_axis(state.logp_BxMxV, inputs_B[:, None, None], -1)[..., 0]
    prefix_BxM = state.prefix_BxM + observed_BxM  # at t = 0: zeros + zeros
    inputs_BxT = jax.lax.dynamic_update_slice_in_dim(state.inputs_BxT, inputs_B[:, None], t, 1)
    prefix_BxTxM = jax.lax.dynamic_update_slice_in_dim(
      state.prefix_BxTxM, prefix_BxM[:, None], t, 1
    )
    log_gate_BxTxM = models.gate_log_weights(gate_cfg, gate_params, inputs_BxT, prefix_BxTxM)
    log_gate_Bx1xM = jax.lax.dynamic_slice_in_dim(log_gate_BxTxM, t, 1, 1)
    logp_BxMxV, expert_state = experts.step(state.experts, inputs_B, t)
    mixture_BxV = gating.causal_mixture_next_token(log_gate_Bx1xM, logp_BxMxV[:, None])[:, 0]
    return mixture_BxV, _MixtureState(
      expert_state, logp_BxMxV, prefix_BxM, inputs_BxT, prefix_BxTxM
    )

  return Stepper(init, step)


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
