"""The stochastic primal-dual game and its certificate (docs/math.md §4).

    state = init_state(params, primal_opt, dual, key)
    step  = make_step(loss_fn, primal_opt, dual)      # pure: (state, batch) -> (state, metrics)
    state, metrics = run(step, state, num_steps)      # lax.scan under jit

`loss_fn(params, batch, key) -> losses_K` returns the per-domain losses L̂_k(w)
of one stratified minibatch (or exact expectations). Each step:

  1. L̂ = loss_fn(w, batch, fold_in(key, step));
  2. primal descent with ∇_w Σ_k λ_k L̂_k(w) through any optax optimizer (an
     optimistic one, `optax.optimistic_adam_v2`, for the optimistic game of §9);
  3. dual mirror ascent λ ← Proj^KL_Λ(λ ⊙ exp(η L̂'(w))) (simultaneous; optimistic:
     along 2 L̂'_t − L̂'_{t−1}), where L̂' = L̂, or, with `dual_loss_fn(params, key)`,
     the losses at the same w on data held out from the primal step;
  4. running mean λ̄ of the λ played and a debiased EMA of w.

The metrics of each step are the per-domain losses L̂ and the λ played (the
objective Σ_k λ_k L̂_k is their dot product), and the dual's L̂' when it has its own.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from robust_gate import closures
from robust_gate.dual import AnyDualState, DualTransform
from robust_gate.uncertainty import UncertaintySet

LossFn = Callable[[Any, Any, jax.Array], jax.Array]
# The dual player's per-domain losses on data of its own: (params, key) -> losses [K].
DualLossFn = Callable[[Any, jax.Array], jax.Array]


@struct.dataclass
class GameState:
  step: jax.Array  # number of completed steps (int32).
  params: Any  # gate parameters w.
  opt_state: Any  # primal optimizer state.
  dual_state: AnyDualState  # log λ, the dual step count (and the optimistic player's L̂_{t−1}).
  lam_avg_K: jax.Array  # λ̄, the running mean of the λ played (Λ's prior at step 0).
  ema_params: Any  # debiased EMA of w_1..w_t (w itself when ema_decay = 0).
  key: jax.Array  # base PRNG key; step t uses fold_in(key, t).

  @property
  def lam_K(self) -> jax.Array:
    """The current (last) λ."""
    return jnp.exp(self.dual_state.log_lam_K)


def init_state(
  params: Any,
  primal_opt: optax.GradientTransformation,
  dual: DualTransform,
  key: jax.Array,
  lam_K=None,
) -> GameState:
  """The game's initial state; λ starts at a point of Λ: the KL projection of `lam_K`
  onto Λ (`lam_K` itself when it is one), or Λ's prior.

  The state holds copies of `params` and `key`: `run` donates the state, and the
  caller's arrays (a trained model's parameters, to warm-start from) must outlive it.
  """
  dual_state = dual.init(lam_K)
  params = jax.tree_util.tree_map(jnp.copy, params)
  return GameState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=primal_opt.init(params),
    dual_state=dual_state,
    lam_avg_K=jnp.exp(dual_state.log_lam_K),
    ema_params=jax.tree_util.tree_map(jnp.copy, params),
    key=jnp.copy(key),
  )


def make_step(
  loss_fn: LossFn,
  primal_opt: optax.GradientTransformation,
  dual: DualTransform,
  *,
  ema_decay: float = 0.0,
  dual_loss_fn: DualLossFn | None = None,
):
  """Builds the pure step `(state, batch) -> (state, metrics)` of §4.

  With `dual_loss_fn`, the dual player ascends along its losses at the same w (the
  state's, as the primal step's) instead of the primal's: losses on data the primal
  step is not fitted to, so that λ grows where w generalizes worst rather than where
  it fits worst (docs/math.md §4). Its key is folded from the step's, a stream the
  primal's batch never uses.
  """
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")

  def step(state: GameState, batch: Any):
    lam_K = state.lam_K
    key = jax.random.fold_in(state.key, state.step)

    def objective(params):
      losses_K = loss_fn(params, batch, key)
      chex.assert_shape(losses_K, lam_K.shape)
      return jnp.dot(lam_K, losses_K), losses_K

    grads, losses_K = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = primal_opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics, dual_losses_K = {"losses": losses_K, "lam": lam_K}, losses_K
    if dual_loss_fn is not None:
      dual_losses_K = dual_loss_fn(state.params, jax.random.fold_in(key, 1))
      chex.assert_shape(dual_losses_K, lam_K.shape)
      metrics["dual_losses"] = dual_losses_K
    _, dual_state = dual.update(jax.lax.stop_gradient(dual_losses_K), state.dual_state)
    # Debiased: the average of w_1..w_t with weights ∝ decay^(t−s), so w_0 (the init)
    # carries no weight however short the run; α_1 = 1, and decay 0 gives w exactly.
    decay, t = jnp.float32(ema_decay), (state.step + 1).astype(jnp.float32)
    alpha = (1.0 - decay) / (1.0 - decay**t)
    ema_params = optax.incremental_update(params, state.ema_params, alpha)
    # Renormalized each step: float32 running means otherwise drift off Σ = 1.
    lam_avg_K = state.lam_avg_K + (lam_K - state.lam_avg_K) / (state.step + 1)
    new_state = state.replace(  # type: ignore[attr-defined]  # flax.struct adds it
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      dual_state=dual_state,
      lam_avg_K=lam_avg_K / jnp.sum(lam_avg_K),
      ema_params=ema_params,
    )
    return new_state, metrics

  return step


# XLA:GPU runs the scanned step as one CUDA graph whose kernels, by default, run one
# after another. A small gate's step is dozens of tiny kernels, many of them
# independent (each parameter's gradient and Adam update, the dual step, the
# metrics), so its time is their sum; CONCURRENT lets the graph run the independent
# ones side by side, with bitwise the same results (the scan phase of
# `robust_gate.benchmark` times both and checks the equality; docs/performance.md
# has the numbers). The CPU backend ignores it.
COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


def _scan(step: closures.Hoisted, consts, state, num_steps, batches, unroll):
  return jax.lax.scan(
    lambda s, b: step(consts, s, b), state, batches, length=num_steps, unroll=unroll
  )


# The compiled loop: with COMPILER_OPTIONS (`run`'s default), and without (the ablation
# the scan benchmark times; the same program, only XLA's options differ).
SCANS = {
  concurrent: jax.jit(
    _scan,
    static_argnames=("step", "num_steps", "unroll"),
    donate_argnames=("state",),
    compiler_options=COMPILER_OPTIONS if concurrent else None,
  )
  for concurrent in (True, False)
}


def run(
  step_fn,
  state: GameState,
  num_steps: int,
  batches: Any = None,
  unroll: int = 1,
  *,
  concurrent: bool = True,
):
  """Runs `num_steps` steps inside one `lax.scan` under jit.

  The arrays `step_fn` closes over (a split's tokens, the experts' cache or
  parameters) are arguments of the compiled program, not constants compiled into it
  (robust_gate.closures): the step is traced once per shapes, the loop compiled once.

  Args:
    step_fn: from make_step (build it once and reuse it).
    state: the GameState (donated).
    num_steps: number of steps.
    batches: None (loss_fn samples from its key, or uses exact expectations)
      or a pytree with leading axis num_steps, one slice per step.
    unroll: steps per loop iteration of the compiled scan (lax.scan's `unroll`).
    concurrent: compile with COMPILER_OPTIONS (False: XLA's defaults).

  Returns:
    (state, metrics) with every metric stacked over steps.
  """
  batch = None if batches is None else jax.tree_util.tree_map(_one_step, batches)
  step, consts = closures.hoist(step_fn, state, batch)
  return SCANS[concurrent](step, consts, state, num_steps, batches, unroll)


def _one_step(x) -> jax.ShapeDtypeStruct:
  """The shape of one step's slice of a batch stacked over steps."""
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)


class Certificate(NamedTuple):
  """The §4 upper value on held-out losses (`robust_gate.certificate` adds the lower
  value and the duality gap, §7)."""

  upper: jax.Array  # U = max_{λ∈Λ} Σ_k λ_k L_k.
  lam_worst_K: jax.Array  # a maximizing λ.
  losses_K: jax.Array  # the per-domain L_k.


def certificate(losses_K: jax.Array, uncertainty: UncertaintySet) -> Certificate:
  """The upper value over Λ of the linearized objective at held-out losses."""
  upper, lam_worst_K = uncertainty.max_linear(losses_K)
  return Certificate(upper, lam_worst_K, losses_K)
