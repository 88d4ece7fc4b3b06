"""The main job's models, each a `Game` that one function trains or restores.

Every trained model of the job (the experts, the three gates, the student, the three
monolithic baselines) is built the same way: a `Game` (its step function, initial
state, step count and spec) from the config and the records of the models it
depends on, then `run_or_restore`, which trains it (resuming from its checkpoints)
or restores its finished state, then a record (robust_gate.records) of the result.
A phase trains its own models and restores the ones it reads through that same
path, so training, restoring and `pipeline.load_models` cannot drift apart. The
experts' caches, which the gates train on, are robust_gate.scoring's.

The config stops here: these functions read it and hand typed values (`Training`,
`models.LMConfig`, `models.GateConfig`, records) to the modules below
(robust_gate.train, distill). `gate_game`, which the experiments share,
takes only typed values.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from robust_gate import checkpoints, distill, experts, models, primal_dual, provenance, streaming
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError
from robust_gate.records import (
  Caches,
  Experts,
  Gate,
  Gates,
  LossFn,
  Monolithic,
  Monoliths,
  Scored,
  Splits,
  Student,
)


@dataclasses.dataclass(frozen=True)
class Training:
  """How one model trains: a config section, typed."""

  steps: int
  lr: float
  per_domain: int  # sequences per domain per step
  seed: int  # the game's PRNG key (batches) and the parameters' initialization
  dual_lr: float = 0.0  # η of the dual player; 0: λ stays where it starts
  ema_decay: float = 0.0  # EMA of the parameters; 0: the EMA is the last iterate
  dual_timescale: float = 0.0  # τ > 0: η_t = η/√(1 + t/τ); 0: η constant (docs/math.md §9.1)
  optimistic: bool = False  # optimistic steps for both players (docs/math.md §9.2)


@dataclasses.dataclass(frozen=True)
class Game:
  """One model's training: `steps` of `step` from `state`, kept in the workdir's
  directory `name`, whose saved `spec` (config sections and input digests) must
  equal this one."""

  name: str
  step: Callable
  state: primal_dual.GameState
  steps: int
  spec: dict


# Trains or restores a Game; returns its final state (see `run_or_restore`).
Runner = Callable[[Game], primal_dual.GameState]


def run_or_restore(
  game: Game, workdir: str, *, train: bool, chunk: int, log
) -> primal_dual.GameState:
  """With train=True, trains `game` (resuming from its newest good checkpoint at or
  before `game.steps`, one checkpoint every `chunk` steps); otherwise restores its
  state at exactly `game.steps`, and raises InputError when the workdir holds none."""
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, game.name), game.spec, name=game.name, log=log, create=train
  )
  if train:
    if game.steps not in ckpt.steps():  # a finished model keeps the record of its training
      provenance.record_training(ckpt.directory)
    state, _ = train_lib.fit(
      game.step, game.state, game.steps, name=game.name, log=log, chunk=chunk, checkpointer=ckpt
    )
    return state
  restored = ckpt.restore(game.state, step=game.steps)
  if restored is None:
    raise InputError(
      f"{game.name}: no finished run in {workdir} (no checkpoint at step "
      f"{game.steps}, the config's last; saved: {ckpt.steps() or 'none'}): run its "
      f"phase first, or launch/main.py, which runs every phase."
    )
  return restored


# ------------------------------------------------------------ typed builders


def gate_game(
  cfg: models.GateConfig,
  train: Scored,
  t: Training,
  uncertainty: uncertainty_lib.UncertaintySet | None,
  params=None,
  *,
  dual_on: Scored | None = None,
  lam_K=None,
  budget_bytes: int | None = None,
):
  """(step, initial state, loss_fn) of a causal gate over `train`'s cached experts.

  `params` defaults to a fresh gate from `t.seed`; `uncertainty` None is the
  simplex (with dual_lr 0: λ fixed at `lam_K`, by default the uniform mixture: the
  ERM gate). With `dual_on`, the dual player sees the gate's losses on minibatches of
  that split (held out from `train`) rather than its training losses (docs/math.md §4).
  A split whose tokens and cache exceed `budget_bytes` streams from the host
  (robust_gate.streaming); None keeps every split on the devices.
  """
  loss_fn = _gate_loss_fn(cfg, train, t.per_domain, budget_bytes)
  dual_loss_fn = None
  if dual_on is not None:
    dual_loss_fn = _gate_loss_fn(cfg, dual_on, t.per_domain, budget_bytes)
  if params is None:
    params = models.init_gate(cfg, _init_key(t.seed, 2))
  step, state = train_lib.make_game(
    loss_fn,
    params,
    num_domains=train.data.num_domains,
    lr=t.lr,
    dual_lr=t.dual_lr,
    seed=t.seed,
    uncertainty=uncertainty,
    lam_K=lam_K,
    ema_decay=t.ema_decay,
    dual_on=dual_loss_fn,
    dual_timescale=t.dual_timescale,
    optimistic=t.optimistic,
  )
  return step, state, loss_fn


def _gate_loss_fn(
  cfg: models.GateConfig, on: Scored, per_domain: int, budget_bytes: int | None
) -> LossFn:
  source = streaming.choose(on.data, on.cache_NxTxM, budget_bytes=budget_bytes)
  return train_lib.gate_loss_fn(cfg, source, None, per_domain, _baseline_K(on))


def _baseline_K(on: Scored) -> jax.Array:
  return jnp.asarray(on.baseline_K, jnp.float32)


def _train_source(config, d) -> streaming.Source:
  """A split's tokens for a model's training: on the devices while they fit
  `config.device_budget_bytes`, streamed from the host beyond it."""
  return streaming.choose(d, budget_bytes=config.get("device_budget_bytes"))


def _init_key(seed: int, phase: int) -> jax.Array:
  """The parameter-initialization key of phase 1 (experts), 2 (gates), 3 (monolithic)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), phase)


# ------------------------------------------------------- config → typed values


def lm_config(section, vocab_size: int, max_len: int, dtype: str) -> models.LMConfig:
  """A transformer's architecture from a config section (d_model, num_layers, ...)."""
  return models.LMConfig(
    vocab_size=vocab_size,
    max_len=max_len,
    d_model=section.d_model,
    num_layers=section.num_layers,
    num_heads=section.num_heads,
    d_ff=section.d_ff,
    dtype=dtype,
  )


def gate_config(config, num_experts: int, vocab_size: int, hidden=None) -> models.GateConfig:
  """The gate network of `config.gate` (its width `hidden` unless given)."""
  gc = config.gate
  return models.GateConfig(
    num_experts=num_experts,
    vocab_size=vocab_size,
    max_len=config.data.max_len,
    hidden=hidden or gc.hidden,
    token_embed=gc.token_embed,
    pos_embed=gc.pos_embed,
  )


def gate_training(config, dual_lr: float) -> Training:
  gc = config.gate
  return Training(
    gc.steps,
    gc.lr,
    gc.per_domain,
    config.seed,
    dual_lr,
    gc.ema_decay,
    gc.dual_timescale,
    bool(gc.optimistic),
  )


# Fields added to a section after workdirs were written, with the value every run had
# before: a spec leaves such a field out at that value, so those workdirs still load.
ADDED = {"distill": {"weights": "lam_bar"}}


def _section(config, name):
  """A config section as a dict, without `steps` (more steps extend a run) and without
  an `ADDED` field at its old value."""
  old = ADDED.get(name, {})
  return {
    k: v
    for k, v in config[name].to_dict().items()
    if k != "steps" and not (k in old and v == old[k])
  }


def _common_spec(config):
  return {"seed": config.seed, "data": config.data.to_dict()}


def _uncertainty_spec(config):
  return {k: config[k] for k in ("uncertainty", "box_lo", "box_hi", "kl_radius")}


# ------------------------------------------------------------------- the models


def train_experts(config, splits: Splits, run: Runner) -> Experts:
  """The K experts, stacked; expert k trained on domain k (λ fixed)."""
  tr, ec = splits.train, config.expert
  lm_cfg = lm_config(ec, tr.vocab_size, config.data.max_len, config.dtype)
  step, state = train_lib.make_game(
    train_lib.expert_loss_fn(lm_cfg, _train_source(config, tr), ec.per_domain),
    models.init_stacked_lm(lm_cfg, _init_key(config.seed, 1), tr.num_domains),
    num_domains=tr.num_domains,
    lr=ec.lr,
    dual_lr=0.0,
    seed=config.seed,
  )
  spec = {**_common_spec(config), "expert": _section(config, "expert"), "dtype": config.dtype}
  params = run(Game("experts", step, state, ec.steps, spec)).params
  return Experts(lm_cfg, params, experts.transformer_experts(lm_cfg, params, tr.domains))


def train_gates(config, caches: Caches, run: Runner) -> Gates:
  """The robust gate, the ERM gate and the best response to the robust gate's λ̄, each
  fitted to `caches.fit`; the robust gate's dual player sees `caches.holdout`.

  The gate evaluated, distilled and reported is the EMA of w (`Gate.params`,
  `config.gate.ema_decay`; docs/math.md §4); at decay 0 it is the last iterate.
  """
  fit = caches.fit
  cfg = gate_config(config, fit.data.num_domains, fit.data.vocab_size)
  lam_set = uncertainty_lib.from_config(config, fit.data.num_domains)
  spec = {
    **_common_spec(config),
    "experts": caches.experts.digest,
    "baseline": config.baseline,
  }

  def gate(name, dual_lr, extra_spec, **game):
    t = gate_training(config, dual_lr)
    step, state, loss_fn = gate_game(
      cfg, fit, t, **game, budget_bytes=config.get("device_budget_bytes")
    )
    gate_spec = {**spec, "gate": {**_section(config, "gate"), "dual_lr": dual_lr}, **extra_spec}
    return Gate(cfg, run(Game(name, step, state, config.gate.steps, gate_spec)), loss_fn)

  # Its dual plays over Λ whatever its step, so that λ, and with it λ̄, is a point of
  # the Λ its certificate maximizes over from step 0 (Λ's prior λ0; docs/math.md §4).
  # At gate.dual_lr 0 λ stays at λ0 (uniform for the config's sets: the ERM gate).
  robust = gate(
    "robust_gate",
    config.gate.dual_lr,
    _uncertainty_spec(config),
    uncertainty=lam_set,
    dual_on=caches.holdout,
  )
  erm = gate("erm_gate", 0.0, {}, uncertainty=None)  # Λ's simplex, λ fixed at uniform
  # The lower value's best response (docs/math.md §7.1): λ fixed at λ̄, warm-started
  # from the robust gate's EMA; its spec holds the robust gate's digest, so a changed
  # robust gate retrains it.
  lam_bar_K = robust.state.lam_avg_K
  best_response = gate(
    "best_response",
    0.0,
    {"robust_gate": experts.params_fingerprint(robust.state)},
    uncertainty=None,
    params=robust.params,
    lam_K=lam_bar_K / jnp.sum(lam_bar_K),
  )
  return Gates(robust_gate=robust, erm_gate=erm, best_response=best_response)


def distill_student(config, splits: Splits, caches: Caches, robust: Gate, run: Runner) -> Student:
  """One expert-sized student distilled from the robust gated model, its domains weighted
  as config.distill.weights says (`distill.student_weights`)."""
  tr, dc, ex = splits.train, config.distill, caches.experts
  lam_bar = robust.state.lam_avg_K
  params, init_from = distill.student_init(ex.params, lam_bar)
  step, state = train_lib.make_game(
    distill.distill_loss_fn(
      ex.lm_cfg, ex.params, robust.cfg, robust.params, _train_source(config, tr), dc.per_domain
    ),
    params,
    num_domains=tr.num_domains,
    lr=dc.lr,
    dual_lr=0.0,
    seed=config.seed,
    lam_K=distill.student_weights(dc.weights, lam_bar),
  )
  spec = {
    **_common_spec(config),
    "experts": ex.digest,
    "robust_gate": experts.params_fingerprint(robust.state),
    "distill": _section(config, "distill"),
    "dtype": config.dtype,
  }
  state = run(Game("student", step, state, dc.steps, spec))
  return Student(lm_cfg=ex.lm_cfg, params=state.params, init_from=init_from)


def train_monoliths(config, splits: Splits, caches: Caches, run: Runner) -> Monoliths:
  """The monolithic baselines: an expert's size (ERM and group DRO) and all experts' size.

  Group DRO's dual player sees what the robust gate's does: the model's losses on
  minibatches of `caches.holdout`, with its b_k (docs/math.md §4), not its own.
  """
  tr = splits.train
  K = tr.num_domains
  mc, lc = config.monolithic, config.monolithic_large
  lam_set = uncertainty_lib.from_config(config, K)
  expert_size = caches.experts.lm_cfg
  large = lm_config(lc, tr.vocab_size, config.data.max_len, config.dtype)
  out = {}
  for name, cfg, section, dual_lr in (
    ("monolithic", expert_size, mc, 0.0),
    ("monolithic_dro", expert_size, mc, mc.dro_dual_lr),
    ("monolithic_large", large, lc, 0.0),
  ):
    per_domain = section.get("per_domain") or mc.per_domain
    source = _train_source(config, tr)
    loss_fn = train_lib.monolithic_loss_fn(cfg, source, per_domain, _baseline_K(caches.validation))
    dual_on = None
    if dual_lr and caches.holdout is not None:
      held = caches.holdout
      dual_on = train_lib.monolithic_loss_fn(
        cfg, _train_source(config, held.data), per_domain, _baseline_K(held)
      )
    step, state = train_lib.make_game(
      loss_fn,
      models.init_lm(cfg, _init_key(config.seed, 3)),
      num_domains=K,
      lr=section.lr,
      dual_lr=dual_lr,
      seed=config.seed,
      uncertainty=lam_set if dual_lr else None,
      dual_on=dual_on,
    )
    spec = {
      **_common_spec(config),
      "experts": caches.experts.digest,
      "baseline": config.baseline,
      "model": cfg.spec(),  # without LMConfig.attention: old workdirs stay valid
      "lr": section.lr,
      "dual_lr": dual_lr,
      "per_domain": per_domain,
      **(
        {**_uncertainty_spec(config), "dual_holdout": config.gate.dual_holdout} if dual_lr else {}
      ),
    }
    state = run(Game(name, step, state, section.steps, spec))
    out[name] = Monolithic(lm_cfg=cfg, params=state.params, loss_fn=loss_fn)
  return Monoliths(**out)
