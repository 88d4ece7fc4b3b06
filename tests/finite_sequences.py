"""A sequence space small enough to enumerate, for the sequence-level gate's tests: two
experts drawing tokens i.i.d. from θ_j over {EOS, 1, 2} until EOS or T targets."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import sampling, sequence_level
from robust_gate.data import DomainData

THETA_MxV = np.array([[0.2, 0.6, 0.2], [0.35, 0.15, 0.5]])
M, V, T = 2, 3, 4


def scored(targets_NxT, mask_NxT) -> np.ndarray:
  """The experts' token log-probabilities of the masked targets, [N, T, M] (0 elsewhere)."""
  logp_NxTxM = np.log(THETA_MxV.T[targets_NxT])
  return np.where(mask_NxT[..., None], logp_NxTxM, 0.0).astype(np.float32)


def outcomes() -> DomainData:
  """Every outcome of a draw, once: n < T tokens then EOS, or T tokens without one (a
  draw that never stops within the context). domain_N is 0 throughout."""
  targets, masks = [], []
  for n in range(T + 1):
    for toks in itertools.product([1, 2], repeat=n):
      seq = list(toks) + ([0] if n < T else [])
      targets.append(seq + [0] * (T - len(seq)))
      masks.append([True] * len(seq) + [False] * (T - len(seq)))
  return as_data(np.array(targets), np.array(masks), np.zeros(len(targets), np.int32))


def as_data(targets_NxT, mask_NxT, domain_N) -> DomainData:
  inputs_NxT = np.concatenate([np.zeros_like(targets_NxT[:, :1]), targets_NxT[:, :-1]], axis=1)
  names = tuple(f"expert_{j}" for j in range(M))
  return DomainData(inputs_NxT, targets_NxT, mask_NxT, domain_N, names, V)


def features(d: DomainData) -> sequence_level.Features:
  return sequence_level.features(scored(d.targets_NxT, d.mask_NxT), d.mask_NxT, d.targets_NxT)


def expert_draws(num: int, seed: int) -> DomainData:
  """`num` draws of each expert by the library's sampler, pooled (rows j·num … are j's)."""
  logits_MxV = jnp.log(jnp.asarray(THETA_MxV, jnp.float32))
  targets, masks = [], []
  for j in range(M):
    next_fn = lambda x, j=j: jnp.broadcast_to(logits_MxV[j], (*x.shape, V))
    tokens, mask = jax.jit(lambda k, f=next_fn: sampling.sample(f, k, num, T))(
      jax.random.PRNGKey(seed + j)
    )
    targets.append(np.asarray(tokens))
    masks.append(np.asarray(mask))
  domain_N = np.repeat(np.arange(M, dtype=np.int32), num)
  return as_data(np.concatenate(targets), np.concatenate(masks), domain_N)


def by_expert(f: sequence_level.Features) -> sequence_level.Features:
  """Pooled features of `expert_draws` with leading axes [M, S]."""
  return jax.tree_util.tree_map(lambda a: a.reshape(M, -1, *a.shape[1:]), f)
