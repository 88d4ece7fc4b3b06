"""Training phases as primal-dual games over per-domain losses (docs/math.md §4, §6).

One mechanism trains everything: `primal_dual.make_step` with a loss function
that returns per-domain losses from a stratified minibatch. Each factory takes a
split (a DomainData: on the devices whole, the minibatch drawn inside jit) or a
`streaming.Source` that may stream it (the host gathers each chunk's rows, the same
rows; robust_gate.streaming):

* experts: K stacked models, model k scored on domain k, λ fixed (dual step 0);
* monolithic models: one model on every domain, λ fixed (ERM on the uniform
  mixture) or moved by the dual player (group DRO);
* gates: a causal gate over the cached expert log-probs, λ fixed (the ERM gate, the
  best response to λ̄) or robust (the game, its dual player on held-out losses).

`fit` runs the steps in `lax.scan` chunks, a streamed game's rows gathered one chunk
ahead, and prints progress with rate and ETA.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_gate import checkpoints, gating, models, parallel, primal_dual, streaming
from robust_gate import data as data_lib
from robust_gate import dual as dual_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.streaming import Source


def device_arrays(d: data_lib.DomainData) -> dict:
  return {
    "inputs": jnp.asarray(d.inputs_NxT),
    "targets": jnp.asarray(d.targets_NxT),
    "mask": jnp.asarray(d.mask_NxT),
  }


def per_domain_token_loss(nll_KxBxT, mask_KxBxT, baseline_K):
  """Σ NLL / Σ tokens per domain, minus b_k: nats per token."""
  total_K = jnp.sum(jnp.where(mask_KxBxT, nll_KxBxT, 0.0), axis=(1, 2))
  return total_K / jnp.sum(mask_KxBxT, axis=(1, 2)) - baseline_K


def _source(d: data_lib.DomainData | Source, cache_NxTxM=None) -> Source:
  """A DomainData (and its cache) as a resident Source; a Source as it is."""
  if not isinstance(d, Source):
    return Source(d, cache_NxTxM)
  if cache_NxTxM is not None:
    raise ValueError("the Source holds the cache: pass cache_NxTxM=None with a Source.")
  return d


def expert_loss_fn(config: models.LMConfig, d: data_lib.DomainData | Source, per_domain: int):
  """Stacked experts, expert k trained on domain k: losses [K]."""
  parallel.check_divisible(per_domain, "per_domain (experts)")

  def losses(params_K, rows):
    nll_KxBxT = -jax.vmap(models.token_logprobs, in_axes=(None, 0, 0, 0))(
      config, params_K, rows["inputs"], rows["targets"]
    )
    return per_domain_token_loss(nll_KxBxT, rows["mask"], 0.0)

  return streaming.loss_fn(_source(d), per_domain, ("inputs", "targets", "mask"), losses, axis=1)


def monolithic_loss_fn(
  config: models.LMConfig, d: data_lib.DomainData | Source, per_domain: int, baseline_K
):
  """One model scored on every domain: losses [K]."""
  parallel.check_divisible(per_domain, "per_domain (monolithic)")
  K = _source(d).data.num_domains

  def losses(params, rows):
    logp = models.token_logprobs(config, params, rows["inputs"], rows["targets"])
    mask_KxBxT = rows["mask"].reshape(K, per_domain, -1)
    return per_domain_token_loss(-logp.reshape(K, per_domain, -1), mask_KxBxT, baseline_K)

  return streaming.loss_fn(_source(d), per_domain, ("inputs", "targets", "mask"), losses, axis=0)


def gate_loss_fn(
  config: models.GateConfig,
  d: data_lib.DomainData | Source,
  cache_NxTxM,
  per_domain: int,
  baseline_K,
):
  """The causal gated mixture over cached expert log-probs: losses [K]. `d` and its
  cache, or a Source holding both (then `cache_NxTxM` is None)."""
  parallel.check_divisible(per_domain, "per_domain (gate)")
  K = baseline_K.shape[0]

  def losses(params, rows):
    logp_mix = gated_logprobs(config, params, rows["inputs"], rows["cache"], rows["mask"])
    mask_KxBxT = rows["mask"].reshape(K, per_domain, -1)
    return per_domain_token_loss(-logp_mix.reshape(K, per_domain, -1), mask_KxBxT, baseline_K)

  source = _source(d, cache_NxTxM)
  return streaming.loss_fn(source, per_domain, ("inputs", "cache", "mask"), losses, axis=0)


def gated_logprobs(config: models.GateConfig, params, inputs_BxT, logp_BxTxM, mask_BxT):
  """log p_w(x_t | x_<t) of the causal gated model (docs/math.md §2.1), [B, T]."""
  prefix = models.prefix_loglik(logp_BxTxM, mask_BxT)
  log_gate = models.gate_log_weights(config, params, inputs_BxT, prefix)
  return gating.causal_mixture_logp(log_gate, logp_BxTxM)


def make_game(
  loss_fn,
  params,
  *,
  num_domains: int,
  lr: float,
  dual_lr: float,
  seed: int,
  uncertainty=None,
  weight_decay: float = 0.0,
  lam_K=None,
  ema_decay: float = 0.0,
  dual_loss_fn: primal_dual.DualLossFn | None = None,
  dual_on=None,
  dual_timescale: float = 0.0,
  optimistic: bool = False,
):
  """(step_fn, initial GameState): Adam(W) primal, mirror-ascent dual from `lam_K`,
  an EMA of the parameters with `ema_decay` (0: the EMA is the last iterate).

  The dual ascends along the primal's losses, or along `dual_loss_fn(params, key)`'s,
  or along `dual_on`'s: a loss function like `loss_fn` (from these factories, resident
  or streamed) over data held out from the primal's (docs/math.md §4). Its step is
  `dual_lr`, or `dual_lr/√(1 + t/dual_timescale)` when `dual_timescale` > 0 (§9.1).
  `optimistic`: both players take the optimistic step, optax.optimistic_adam_v2 and
  optimistic mirror ascent (§9.2). When a loss is streamed, the step is a
  `streaming.StreamedStep` carrying the feed of its rows (`fit` runs it).
  """
  if dual_loss_fn is not None and dual_on is not None:
    raise ValueError("give the dual player dual_loss_fn or dual_on, not both.")
  uncertainty = uncertainty or uncertainty_lib.simplex(num_domains)
  if optimistic and weight_decay:
    raise ValueError("the optimistic primal (optimistic_adam_v2) has no weight decay.")
  if optimistic:
    primal = optax.optimistic_adam_v2(lr)
  else:
    primal = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
  eta = dual_lib.inverse_sqrt_schedule(dual_lr, dual_timescale) if dual_timescale else dual_lr
  dual = dual_lib.mirror_ascent(eta, uncertainty, optimistic=optimistic)
  make = lambda dual_fn: primal_dual.make_step(
    loss_fn, primal, dual, ema_decay=ema_decay, dual_loss_fn=dual_fn
  )
  if isinstance(loss_fn, streaming.StreamedLoss) or isinstance(dual_on, streaming.StreamedLoss):
    make(None)  # its settings checked now, not when the step is traced
    step = streaming.streamed_step(loss_fn, dual_on, make)
  elif dual_on is not None:
    step = make(lambda params, key: dual_on(params, None, key))
  else:
    step = make(dual_loss_fn)
  state = primal_dual.init_state(params, primal, dual, jax.random.PRNGKey(seed), lam_K)
  return step, parallel.replicate(state)


def fit(
  step_fn,
  state,
  num_steps: int,
  *,
  name: str,
  log: Callable = print,
  chunk: int = 100,
  checkpointer=None,
) -> tuple[Any, dict]:
  """Runs `num_steps` in lax.scan chunks, logging rate and ETA after each.

  With a `checkpoints.Checkpointer`, the run resumes from its newest good
  checkpoint at or before step `num_steps` (a later run's checkpoints are left as
  they are), and a checkpoint and the chunk's metric lines are written after every
  chunk, the last one marked final. The resumed steps' metric rows are checked
  against the checkpoint; the missing ones are rebuilt by replaying the run from
  `state` (`Checkpointer.metrics`). A non-finite loss or λ stops the run with
  FloatingPointError (one line) before anything of its chunk is saved, so the last
  good checkpoint stays intact.

  Returns:
    (state, history): the final state and every step's metrics, stacked (without
    the steps whose metric rows were lost and could not be rebuilt).
  """
  rows = []
  if checkpointer is not None:
    saved = checkpointer.steps()
    if saved and saved[0] > num_steps:
      raise InputError(
        f"{name}: its checkpoints in {checkpointer.directory} are at steps {saved}, all "
        f"past the {num_steps} steps asked for; ask for {saved[0]} steps (or more) or use "
        f"another workdir."
      )
    initial, restored = state, checkpointer.restore(state, up_to=num_steps)
    if restored is not None:
      state = restored
      log(f"{name}: resumed at step {int(state.step)} from {checkpointer.directory}")
    replay = lambda: fit(
      step_fn, initial, int(restored.step), name=name, log=lambda s: None, chunk=chunk
    )
    rows = checkpointer.metrics(state, replay)
  done = int(state.step)
  history = [checkpoints.stack_metrics(rows)] if rows else []
  start, first = time.perf_counter(), done
  chunks = _chunks(done, num_steps, chunk)
  with streaming.Prefetch(step_fn, state.key, chunks) as batches:
    for _, n in chunks:
      try:
        state, metrics = primal_dual.run(step_fn, state, n, next(batches))
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        kept = f"; its checkpoint at step {done} is kept" if checkpointer and done else ""
        raise InputError(
          f"{name} ran out of device memory at steps {done + 1}–{done + n} "
          f"({str(e).splitlines()[0]}){kept}: lower its config section's per_domain "
          f"or the model's size."
        ) from None
      metrics = jax.tree_util.tree_map(np.asarray, metrics)
      done += n
      _check_finite(metrics, name, done, saved_before=checkpointer is not None and done > n)
      if checkpointer is not None:
        checkpointer.save(state, metrics, final=done == num_steps)
      history.append(metrics)
      rate = (done - first) / (time.perf_counter() - start)
      log(
        f"{name}: step {done}/{num_steps}  {rate:.1f} steps/s  "
        + _progress(metrics, rate, num_steps - done)
      )
  if not history:
    return state, {}
  # The newest chunk's metric names (rows resumed from an older version may hold more).
  return state, {k: np.concatenate([h[k] for h in history]) for k in history[-1]}


def _check_finite(metrics: dict, name: str, done: int, saved_before: bool) -> None:
  """FloatingPointError (one line) at the chunk's first non-finite loss or λ."""
  n = len(metrics["losses"])
  finite = np.all(np.isfinite(metrics["losses"]), axis=1)
  finite &= np.all(np.isfinite(metrics["lam"]), axis=1)
  if np.all(finite):
    return
  bad = int(np.argmin(finite))
  values = lambda x: " ".join(f"{v:.4g}" for v in x)
  kept = f"; its checkpoint at step {done - n}, the last good one, is kept" if saved_before else ""
  raise FloatingPointError(
    f"{name} diverged: non-finite per-domain loss or λ at step {done - n + bad + 1}: "
    f"losses [{values(metrics['losses'][bad])}], λ [{values(metrics['lam'][bad])}]. "
    f"Nothing of steps {done - n + 1}–{done} was saved{kept}: lower the learning rate of "
    f"{name} (its config section's lr; dual_lr if λ diverged) and run again."
  )


def _progress(metrics: dict, rate: float, left: int) -> str:
  losses, lam = metrics["losses"][-1], metrics["lam"][-1]
  held = metrics.get("dual_losses")  # what the dual player saw, if not the losses
  return (
    f"ETA {left / rate:.0f}s  loss max {losses.max():.4f} mean {losses.mean():.4f}  "
    + ("" if held is None else f"dual's max {held[-1].max():.4f}  ")
    + f"λ [{' '.join(f'{x:.3f}' for x in lam)}]"
  )


def _chunks(done: int, num_steps: int, chunk: int) -> list[tuple[int, int]]:
  """(first step, steps) of each chunk from step `done`; the boundaries are the
  multiples of `chunk`, so a resumed run executes the chunks an uninterrupted one does."""
  out = []
  while done < num_steps:
    n = min(chunk - done % chunk, num_steps - done)
    out.append((done, n))
    done += n
  return out
