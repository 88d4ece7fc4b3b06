"""Structural distillation: one expert-sized student from the robust ensemble (docs/math.md §5).

The teacher is the causal gated model p_w(· | x_<t) = Σ_j π_w(x_<t)_j p_j(· | x_<t)
over the frozen experts; its full next-token distributions are computed on the fly
inside the compiled step (they are [B, T, V] per expert: too large to cache at
scale). The student q_θ has one expert's architecture and minimizes

    Σ_k ω_k E_{x~D_k} mean_t KL( p_w(·|x_<t) ‖ q_θ(·|x_<t) )

with ω held fixed (a game whose dual step is 0, started at ω): the uniform mixture, or
the robust gate's least-favorable mixture λ̄ (`student_weights`, config.distill.weights;
docs/math.md §5 says which wins where).

A sequence-level gated model p_w (§2.2) is distilled into a causal gate, which samples
token by token and needs no normalizer: exactly on a finite space
(`sequence_gate_to_causal`), and on data by cross-entropy on draws from p_w
(`importance_log_weights`, `causal_on_samples_loss_fn`). Those draws are the experts' own
samples, importance-resampled: the pooled samples of the M experts (equally many each)
come from q = (1/M) Σ_j p_j, and every density the ratio p_w/q needs is known, with Z_w
cancelling on normalization. The ratio is bounded by M/Z_w (the gate's weights are at
most 1), so the weights cannot degenerate the way weights against an unknown data
density would; data could only be reweighted to p_w through D's density, which no
model here knows.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from robust_gate import data as data_lib
from robust_gate import gating, models, parallel, streaming, train


def teacher_next_token_logprobs(
  lm_cfg: models.LMConfig,
  expert_params_M,
  gate_cfg: models.GateConfig,
  gate_params,
  inputs_BxT,
  targets_BxT,
  mask_BxT,
) -> jax.Array:
  """The gated model's full next-token log-distributions, [B, T, V].

  One forward pass per expert gives both the full distributions and the
  observed-token log-probs that drive the gate's prefix likelihoods.
  """
  logp_MxBxTxV = jax.vmap(models.next_token_logprobs, in_axes=(None, 0, None))(
    lm_cfg, expert_params_M, inputs_BxT
  )
  logp_BxTxMxV = jnp.moveaxis(logp_MxBxTxV, 0, 2)
  return gated_next_token_logprobs(
    logp_BxTxMxV, gate_cfg, gate_params, inputs_BxT, targets_BxT, mask_BxT
  )


def gated_next_token_logprobs(
  logp_BxTxMxV, gate_cfg: models.GateConfig, gate_params, inputs_BxT, targets_BxT, mask_BxT
) -> jax.Array:
  """The gated model's full next-token log-distributions, [B, T, V], from its experts'
  (any experts: robust_gate's transformers, checkpoints of robust_gate.hf, ...).

  The observed tokens' log-probs, read off the full distributions, drive the gate's
  prefix likelihoods, so one forward pass per expert gives both.
  """
  observed_BxTxM = jnp.take_along_axis(logp_BxTxMxV, targets_BxT[:, :, None, None], axis=-1)[..., 0]
  prefix = models.prefix_loglik(observed_BxTxM, mask_BxT)
  log_gate = models.gate_log_weights(gate_cfg, gate_params, inputs_BxT, prefix)
  return gating.causal_mixture_next_token(log_gate, logp_BxTxMxV)


def token_kl(teacher_logp_BxTxV, student_logp_BxTxV) -> jax.Array:
  """KL(teacher ‖ student) at every position, [B, T]."""
  p = jnp.exp(teacher_logp_BxTxV)
  diff = jnp.where(p > 0, teacher_logp_BxTxV - student_logp_BxTxV, 0.0)
  return jnp.sum(p * diff, axis=-1)


def distill_loss_fn(
  lm_cfg: models.LMConfig,
  expert_params_M,
  gate_cfg: models.GateConfig,
  gate_params,
  d: data_lib.DomainData | streaming.Source,
  per_domain: int,
):
  """Per-domain mean token KL(teacher ‖ student) on a stratified batch: losses [K]."""
  teacher_fn = lambda x, y, m: teacher_next_token_logprobs(
    lm_cfg, expert_params_M, gate_cfg, gate_params, x, y, m
  )
  student_fn = lambda params, x: models.next_token_logprobs(lm_cfg, params, x)
  return kl_loss_fn(teacher_fn, student_fn, d, per_domain)


def kl_loss_fn(
  teacher_fn,
  student_fn,
  d: data_lib.DomainData | streaming.Source,
  per_domain: int,
  mesh: Mesh | None = None,
):
  """Per-domain mean token KL(teacher ‖ student) on a stratified batch, losses [K], for
  any teacher `(inputs_BxT, targets_BxT, mask_BxT) -> [B, T, V]` log-distributions and
  student `(params, inputs_BxT) -> [B, T, V]` (`distill_loss_fn` is this with
  robust_gate's own transformers; robust_gate.checkpoint_job, with checkpoints).

  `d` is a split (its rows on the devices) or a `streaming.Source` (on the devices, or
  streamed from the host when larger than the device budget, as the other models' data
  is; robust_gate.streaming). The batch is split over every device, or, given `mesh` (a
  data × model mesh, robust_gate.hf.sharding), over its data axis only: a teacher whose
  parameters are split over the model axis then runs as `hf.sharding.score` runs it,
  each group of model devices on its rows, instead of gathering its parameters to
  every device that holds rows."""
  source = d if isinstance(d, streaming.Source) else streaming.Source(d)
  parallel.check_divisible(per_domain, "per_domain (distill)")
  K = source.data.num_domains

  def losses(student_params, rows):
    x, y, m = rows["inputs"], rows["targets"], rows["mask"]
    teacher = jax.lax.stop_gradient(teacher_fn(x, y, m))
    kl_KxBxT = token_kl(teacher, student_fn(student_params, x)).reshape(K, per_domain, -1)
    return train.per_domain_token_loss(kl_KxBxT, m.reshape(K, per_domain, -1), 0.0)

  columns = ("inputs", "targets", "mask")
  return streaming.loss_fn(source, per_domain, columns, losses, axis=0, mesh=mesh)


# The domain weights ω of the distillation loss (config.distill.weights).
DISTILL_WEIGHTS = ("uniform", "lam_bar")


def student_weights(kind: str, lam_bar_K) -> jax.Array:
  """The domain weights ω of the distillation loss, [K], summing to 1: "uniform", or
  "lam_bar", the robust gate's least-favorable mixture λ̄ (renormalized).

  λ̄ says where the teacher's own loss binds, not where the student is far from the
  teacher; where λ̄ is concentrated (0.94 on one domain of the source files on an H200)
  a student weighted by it imitates the teacher on that domain only (docs/math.md §5).
  """
  lam_bar_K = jnp.asarray(lam_bar_K, jnp.float32)
  if kind == "uniform":
    return jnp.full_like(lam_bar_K, 1.0 / lam_bar_K.shape[0])
  if kind == "lam_bar":
    return lam_bar_K / jnp.sum(lam_bar_K)
  raise ValueError(f"unknown distillation weights {kind!r}; expected one of {DISTILL_WEIGHTS}.")


def student_init(expert_params_M, lam_bar_K):
  """The student starts from the expert of the domain with the largest λ̄.

  λ̄'s largest entry is the domain the robust objective binds on, so its expert is the
  closest start where the teacher's worst case is made.
  """
  j = int(jnp.argmax(lam_bar_K))
  return jax.tree_util.tree_map(lambda a: a[j], expert_params_M), j


def sequence_gate_to_causal(
  target_logp_N, seqs_NxL, expert_cond_NxLxMxV, *, steps: int = 2000, lr: float = 0.1
):
  """Distills a sequence-level gated model into a causal gate (docs/math.md §5), exactly.

  On a finite space of all N = V^L sequences of length L, the sequence-level model
  p_g(x) (any normalized log-probabilities `target_logp_N`, e.g. from
  `gating.sequence_mixture_logp`) is matched by a tabular causal gate π(x_<t) ∈ Δ_M,
  one row per distinct prefix, minimizing KL(p_g ‖ q) with
  q(x) = Π_t Σ_j π_j(x_<t) p_j(x_t | x_<t), a model that samples token by token.

  Args:
    target_logp_N: log p_g(x) of every sequence (sums to 1 in probability).
    seqs_NxL: every sequence of the space, int tokens.
    expert_cond_NxLxMxV: log p_j(· | x_<t) of every expert at every position.
    steps: Adam steps (one lax.scan).
    lr: Adam learning rate.

  Returns:
    (log_gate_NxLxM, kl): the causal gate at every (sequence, position) and the
    final KL(p_g ‖ q) in nats.
  """
  N, L = seqs_NxL.shape
  M, V = expert_cond_NxLxMxV.shape[2:]
  # Prefix ids: x_<t read as a base-V number, offset by the Σ_{u<t} V^u ids of
  # shorter prefixes; sequences sharing x_<t share the gate row at position t.
  codes, offsets = [jnp.zeros(N, jnp.int32)], [0]
  for t in range(1, L):
    codes.append(codes[-1] * V + seqs_NxL[:, t - 1])
    offsets.append(offsets[-1] + V ** (t - 1))
  prefix_NxL = jnp.stack(codes, axis=1) + jnp.asarray(offsets)[None, :]
  num_prefixes = offsets[-1] + V ** (L - 1)
  observed_NxLxM = jnp.take_along_axis(expert_cond_NxLxMxV, seqs_NxL[:, :, None, None], axis=-1)[
    ..., 0
  ]
  p_N = jnp.exp(target_logp_N)

  def log_gate(scores_PxM):
    return jax.nn.log_softmax(scores_PxM[prefix_NxL], axis=-1)

  def kl(scores_PxM):
    log_q_N = jax.nn.logsumexp(log_gate(scores_PxM) + observed_NxLxM, axis=-1).sum(-1)
    return jnp.sum(jnp.where(p_N > 0, p_N * (target_logp_N - log_q_N), 0.0))

  opt = optax.adam(lr)
  scores = jnp.zeros((num_prefixes, M))

  def step(carry, _):
    scores, opt_state = carry
    loss, grads = jax.value_and_grad(kl)(scores)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(scores, updates), opt_state), loss

  (scores, _), _ = jax.lax.scan(step, (scores, opt.init(scores)), None, length=steps)
  return log_gate(scores), kl(scores)


def importance_log_weights(log_gate_NxM, loglik_NxM) -> jax.Array:
  """Self-normalized log importance weights of p_w (§2.2) for samples of the pooled
  experts q = (1/M) Σ_j p_j (§5), [N]: log w_i ∝ log Σ_j g_j(x_i) p_j(x_i) − log Σ_j p_j(x_i).

  p_w(x)/q(x) = M Σ_j g_j(x) p_j(x) / (Z_w Σ_j p_j(x)) ≤ M/Z_w; Z_w cancels in the
  normalization, so no estimate of it enters the weights.

  Args:
    log_gate_NxM: log softmax(s_w(x)) of the sequence-level gate at each sample.
    loglik_NxM: log p_j(x) of every expert at each sample.
  """
  log_ratio_N = jax.nn.logsumexp(log_gate_NxM + loglik_NxM, -1) - jax.nn.logsumexp(loglik_NxM, -1)
  return log_ratio_N - jax.nn.logsumexp(log_ratio_N)


def effective_sample_size(log_w_N) -> float:
  """(Σ w)² / Σ w² of (log) importance weights: how many independent draws they are worth."""
  log_w_N = jnp.asarray(log_w_N)
  return float(jnp.exp(2 * jax.nn.logsumexp(log_w_N) - jax.nn.logsumexp(2 * log_w_N)))


def causal_on_samples_loss_fn(
  gate_cfg: models.GateConfig, samples: data_lib.DomainData, cache_NxTxM, log_w_N, batch_size: int
):
  """Cross-entropy of the causal gated model (§2.1) on draws from p_w, nats per token: [1].

  Each step resamples `batch_size` of the pooled expert samples with probabilities
  w = exp(log_w_N) (`importance_log_weights`): sampling-importance-resampling, so the
  minibatch is a draw from p_w's weighted empirical distribution and the loss an
  estimate of Σ_x p_w(x) (−log q_θ(x)) / E_{p_w}[tokens], which KL(p_w ‖ q_θ) differs from
  by a constant. `cache_NxTxM` is the experts' token log-probabilities on the samples.
  """
  arrays, cache = train.device_arrays(samples), jnp.asarray(cache_NxTxM)
  log_w = jnp.asarray(log_w_N)
  parallel.check_divisible(batch_size, "batch_size (causal gate on samples)")

  def loss_fn(params, batch, key):
    del batch
    idx = parallel.shard_batch(jax.random.categorical(key, log_w, shape=(batch_size,)))
    mask = arrays["mask"][idx]
    logp = train.gated_logprobs(gate_cfg, params, arrays["inputs"][idx], cache[idx], mask)
    return train.per_domain_token_loss(-logp[None], mask[None], 0.0)

  return loss_fn
