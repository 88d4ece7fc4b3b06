"""Students of any size distilled from the robust gated teacher (docs/math.md §5).

The main job's student has one expert's architecture (robust_gate.distill). To ask how
far a larger student closes its gap to the teacher, this module gives

  lm_num_params   the parameters of a TransformerLM, from its config alone
  scaled          an architecture of about `ratio` × an expert's parameters
  distill_loss_fn the per-domain token KL(teacher ‖ student) for a student of any
                  architecture, on any split (data, or the teacher's own samples)
  teacher_samples token sequences drawn from the causal gated teacher (§2.1)
  lm_logprobs     a transformer's observed-token log-probs on a split, compiled once
                  per architecture (students of several seeds share the program)
"""

import functools
import math

import jax
import numpy as np

from robust_gate import data as data_lib
from robust_gate import distill, models, sampling
from robust_gate.checks import InputError, check_int, check_real

# A scaled architecture within this relative distance of its target parameter count is
# close enough; among those, `scaled` keeps the expert's shape (width over depth).
SHAPE_SLACK = 0.05
# The domain name of the teacher's samples: they come from no one domain.
TEACHER = "teacher"


def lm_num_params(c: models.LMConfig) -> int:
  """Parameters of `models.TransformerLM(c)`: token and position embeddings, per block
  two LayerNorms, the [D, 3D] attention kernel, the [D, D] output and the MLP with
  biases, then the final LayerNorm and the output layer with bias. Counted without
  building the model, so `scaled` can search many shapes (tests check it against the
  parameters `models.init_lm` builds)."""
  D, F, V = c.d_model, c.d_ff, c.vocab_size
  block = 4 * D * D + 2 * D * F + F + 5 * D
  return V * D + c.max_len * D + c.num_layers * block + 2 * D + D * V + V


def scaled(expert: models.LMConfig, ratio: float, slack: float = SHAPE_SLACK) -> models.LMConfig:
  """An architecture of about `ratio` × `expert`'s parameters, searched over depth and width.

  Every candidate keeps the expert's head width (d_model / num_heads: a width attention
  kernels take, cuDNN's included, wherever the expert's is) and its MLP ratio d_ff /
  d_model, and varies the number of layers and heads. Depth or width alone misses the
  target where the embeddings, which grow with width only, are a large share (small
  vocabularies over small models), so both vary. Among the candidates within `slack` of
  the target, the one whose width-to-depth ratio is nearest the expert's (the shape the
  expert was tuned with) wins, so that sizes differ in scale, not in shape; without one
  within `slack`, the nearest in parameters.
  """
  check_real(ratio, "ratio", 0.0, low_open=True)
  if ratio == 1:
    return expert
  head = expert.d_model // expert.num_heads
  mlp = expert.d_ff / expert.d_model
  target = ratio * lm_num_params(expert)
  shape = math.log(expert.d_model / expert.num_layers)
  reach = max(2, math.ceil(2 * ratio))
  found = []
  for layers in range(1, reach * expert.num_layers + 1):
    for heads in range(1, reach * expert.num_heads + 1):
      d = heads * head
      cfg = models.LMConfig(
        vocab_size=expert.vocab_size,
        max_len=expert.max_len,
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        d_ff=max(1, round(d * mlp)),
        dtype=expert.dtype,
        attention=expert.attention,
      )
      error = abs(lm_num_params(cfg) / target - 1)
      found.append((error, abs(math.log(d / layers) - shape), cfg))
  close = [f for f in found if f[0] <= slack]
  if close:
    return min(close, key=lambda f: (f[1], f[0]))[2]
  return min(found, key=lambda f: f[0])[2]


def distill_loss_fn(
  lm_cfg: models.LMConfig,
  expert_params_M,
  gate_cfg: models.GateConfig,
  gate_params,
  student_cfg: models.LMConfig,
  d: data_lib.DomainData,
  per_domain: int,
):
  """Per-domain mean token KL(teacher ‖ student) on a stratified batch of `d`: losses [K].

  `distill.distill_loss_fn` with the student's architecture its own: the teacher's full
  next-token distributions on the fly (`distill.teacher_next_token_logprobs`), a student
  `student_cfg` of any size on the same vocabulary and context.
  """
  if (student_cfg.vocab_size, student_cfg.max_len) != (lm_cfg.vocab_size, lm_cfg.max_len):
    raise InputError(
      f"the student's vocabulary and context ({student_cfg.vocab_size}, {student_cfg.max_len}) "
      f"must be the teacher's ({lm_cfg.vocab_size}, {lm_cfg.max_len})."
    )
  teacher_fn = lambda x, y, m: distill.teacher_next_token_logprobs(
    lm_cfg, expert_params_M, gate_cfg, gate_params, x, y, m
  )
  student_fn = lambda params, x: models.next_token_logprobs(student_cfg, params, x)
  return distill.kl_loss_fn(teacher_fn, student_fn, d, per_domain)


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _teacher_batch(lm_cfg, expert_params_M, gate_cfg, gate_params, key, batch_size: int):
  """`sampling.sample` from the gated teacher; the parameters are arguments of the
  program (compiled once per architecture and batch size)."""
  next_fn = sampling.gated_next_fn(lm_cfg, expert_params_M, gate_cfg, gate_params)
  return sampling.sample(next_fn, key, batch_size, lm_cfg.max_len)


def teacher_samples(
  lm_cfg: models.LMConfig,
  expert_params_M,
  gate_cfg: models.GateConfig,
  gate_params,
  key: jax.Array,
  num: int,
  batch_size: int = 256,
) -> data_lib.DomainData:
  """`num` sequences drawn token by token from the causal gated teacher at temperature 1,
  as one DomainData of the single domain TEACHER (a draw comes from the teacher, not from
  any one domain), laid out as `data.encode` lays out data.

  Each token costs a forward pass of every expert over the whole context
  (`sampling.sample` keeps no attention cache): about max_len × M expert forward passes
  per sequence, which the experiment reports in seconds.
  """
  check_int(num, "teacher samples")
  check_int(batch_size, "sample batch size")
  batch_size = min(batch_size, num)
  targets, masks = [], []
  for b in range(-(-num // batch_size)):
    tokens, mask = _teacher_batch(
      lm_cfg, expert_params_M, gate_cfg, gate_params, jax.random.fold_in(key, b), batch_size
    )
    take = min(batch_size, num - b * batch_size)  # one compiled shape: the surplus is dropped
    targets.append(np.asarray(tokens)[:take])
    masks.append(np.asarray(mask)[:take])
  targets_NxT = np.concatenate(targets).astype(np.int32)
  inputs_NxT = np.concatenate([np.zeros_like(targets_NxT[:, :1]), targets_NxT[:, :-1]], axis=1)
  return data_lib.DomainData(
    inputs_NxT=inputs_NxT,
    targets_NxT=targets_NxT,
    mask_NxT=np.concatenate(masks),
    domain_N=np.zeros(num, np.int32),
    domains=(TEACHER,),
    vocab_size=lm_cfg.vocab_size,
  )


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(cfg: models.LMConfig, params, inputs_BxT, targets_BxT):
  return models.token_logprobs(cfg, params, inputs_BxT, targets_BxT)


def lm_logprobs(
  cfg: models.LMConfig, params, d: data_lib.DomainData, batch_size: int = 256
) -> np.ndarray:
  """log p(target_t | x_≤t) of every observed token of `d`, [N, T], 0 off the mask.

  One program per architecture and batch size, the parameters its argument, so every
  student of one size (each seed's) is scored by the same compiled program; the last
  batch is padded to that shape.
  """
  N = len(d.inputs_NxT)
  batch_size = min(batch_size, N)
  pad = -N % batch_size
  x = np.pad(d.inputs_NxT, ((0, pad), (0, 0)))
  y = np.pad(d.targets_NxT, ((0, pad), (0, 0)))
  out = [
    np.asarray(_token_logprobs(cfg, params, x[i : i + batch_size], y[i : i + batch_size]))
    for i in range(0, N + pad, batch_size)
  ]
  return np.where(d.mask_NxT, np.concatenate(out)[:N], 0.0).astype(np.float32)
