import glob
import os
import re

import jax
import numpy as np
import optax
import pytest

from robust_gate import checkpoint_job, config_files, data, models, pipeline, train
from robust_gate import dual as dual_lib
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stacked_experts_learn_their_own_domains(tmp_path):
  """Two chains; after training, each expert is best on its own domain's held-out data."""
  opts = dict(
    num_domains=2, num_states=4, seq_len=6, concentration=0.1, examples_per_split=(400, 200, 10)
  )
  tr = data.load_local("markov", "train", str(tmp_path), 8, **opts)
  va = data.load_local("markov", "validation", str(tmp_path), 8, **opts)
  cfg = models.LMConfig(
    vocab_size=tr.vocab_size, max_len=8, d_model=16, num_layers=1, num_heads=2, d_ff=32
  )
  params = models.init_stacked_lm(cfg, jax.random.PRNGKey(0), 2)
  step, state = train.make_game(
    train.expert_loss_fn(cfg, tr, 16), params, num_domains=2, lr=1e-2, dual_lr=0.0, seed=0
  )
  logs = []
  state, hist = train.fit(step, state, 300, name="experts", log=logs.append, chunk=100)
  assert len(logs) == 3 and "ETA" in logs[0]
  assert np.all(hist["losses"][-20:].mean(0) < hist["losses"][:20].mean(0) - 0.1)
  logp = models.stacked_token_logprobs(cfg, state.params, va.inputs_NxT, va.targets_NxT)
  for k in range(2):
    rows = va.domain_N == k
    nll = [-np.asarray(logp[..., j])[rows][va.mask_NxT[rows]].mean() for j in range(2)]
    assert nll[k] < nll[1 - k]


def test_fit_stops_on_a_non_finite_loss():
  def loss_fn(params, batch, key):
    return params["w"] * jax.numpy.array([1.0, jax.numpy.nan])

  step, state = train.make_game(
    loss_fn, {"w": jax.numpy.ones(())}, num_domains=2, lr=0.1, dual_lr=0.1, seed=0
  )
  with pytest.raises(FloatingPointError, match="non-finite per-domain loss or λ at step 1:"):
    train.fit(step, state, 10, name="nan", log=lambda s: None, chunk=5)


def test_fit_reports_device_memory_exhaustion_in_one_line(monkeypatch):
  """XLA's RESOURCE_EXHAUSTED (a batch too large for the device) is the one-line
  InputError naming the model and the steps; any other runtime error propagates."""
  step, state = train.make_game(
    lambda p, b, k: p["w"] * jax.numpy.ones(2),
    {"w": jax.numpy.ones(())},
    num_domains=2,
    lr=0.1,
    dual_lr=0.0,
    seed=0,
  )
  message = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81604378624 bytes.\nXLA"

  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(train.primal_dual, "run", exhausted)
  with pytest.raises(InputError, match=r"^big ran out of device memory at steps 1–5 \(RESOURCE_EX"):
    train.fit(step, state, 10, name="big", log=lambda s: None, chunk=5)
  message = "INTERNAL: something else"
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    train.fit(step, state, 10, name="big", log=lambda s: None, chunk=5)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "launch", "configs", "*.py"))))
def test_every_config_loads_and_is_valid(path):
  import wordfreq  # noqa: F401  the package, imported first: configs must not clash

  config = config_files.load(path)
  if "experts" in config:  # a checkpoint job's (launch/checkpoints.py)
    assert checkpoint_job.expert_paths(config) and checkpoint_job.text_data(config).files
    checkpoint_job.model_mesh(config)
  elif "data" in config:  # main-job configs
    pipeline.check_config(config)
    models.LMConfig(
      vocab_size=256,
      max_len=config.data.max_len,
      d_model=config.monolithic_large.d_model,
      num_layers=config.monolithic_large.num_layers,
      num_heads=config.monolithic_large.num_heads,
      d_ff=config.monolithic_large.d_ff,
    )


def test_a_batch_that_does_not_divide_across_devices_is_refused(monkeypatch):
  d = data.encode(
    [np.array([1, 2])] * 4, np.array([0, 1, 0, 1]), ["a", "b"], vocab_size=3, max_len=4
  )
  cfg = models.LMConfig(vocab_size=3, max_len=4, d_model=8, num_layers=1, num_heads=2, d_ff=8)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  with pytest.raises(
    InputError,
    match=r"per_domain \(experts\)=12 does not divide "
    r"across the 8 devices",
  ):
    train.expert_loss_fn(cfg, d, 12)
  train.expert_loss_fn(cfg, d, 16)  # a multiple of 8 is fine


def test_the_dual_step_follows_its_schedule_and_optimism_switches_both_players():
  """Constant held-out losses [1, 0]: log(λ_1/λ_2) grows by η_t each step, η_t = η with
  dual_timescale 0 and η/√(1 + t/τ) with τ > 0; an optimistic step along 2L − L = L
  is the same, with both players' states the optimistic ones."""
  loss_fn = lambda params, batch, key: params["w"] * jax.numpy.ones(2)
  held_K = jax.numpy.array([1.0, 0.0])

  def log_ratio(**kwargs):
    step, state = train.make_game(
      loss_fn,
      {"w": jax.numpy.ones(())},
      num_domains=2,
      lr=0.1,
      dual_lr=0.3,
      seed=0,
      dual_loss_fn=lambda params, key: held_K,
      **kwargs,
    )
    state, _ = train.fit(step, state, 10, name="g", log=lambda s: None, chunk=10)
    return float(np.diff(-np.asarray(state.dual_state.log_lam_K))[0]), state

  constant, _ = log_ratio()
  decaying, _ = log_ratio(dual_timescale=4.0)
  optimistic, state = log_ratio(optimistic=True)
  np.testing.assert_allclose(constant, 3.0, rtol=1e-5)
  np.testing.assert_allclose(decaying, sum(0.3 / np.sqrt(1 + t / 4) for t in range(10)), rtol=1e-5)
  np.testing.assert_allclose(optimistic, 3.0, rtol=1e-5)
  assert isinstance(state.dual_state, dual_lib.OptimisticDualState)
  like = optax.optimistic_adam_v2(0.1).init({"w": jax.numpy.ones(())})
  assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(like)


@pytest.mark.parametrize(
  "field, value, want",
  [
    ("dual_holdout", 1.0, "must be in [0, 1)"),
    ("dual_holdout", -0.25, "must be in [0, 1)"),
    ("dual_timescale", -1.0, "must be finite and ≥ 0"),
    ("optimistic", 2, "must be 0 or 1"),
  ],
)
def test_new_gate_fields_are_checked_in_one_line(field, value, want):
  config = config_files.load(os.path.join(ROOT, "launch", "configs", "tiny.py"))
  config.gate[field] = value
  with pytest.raises(InputError, match=re.escape(f"config.gate.{field}={value!r} {want}.")):
    pipeline.check_config(config)


def test_the_dual_player_takes_one_loss():
  """dual_loss_fn (params, key) or dual_on (a loss function like the primal's): not both."""
  loss_fn = lambda params, batch, key: params["w"] * jax.numpy.ones(2)
  with pytest.raises(ValueError, match="dual_loss_fn or dual_on, not both"):
    train.make_game(
      loss_fn,
      {"w": jax.numpy.ones(())},
      num_domains=2,
      lr=0.1,
      dual_lr=0.1,
      seed=0,
      dual_loss_fn=lambda params, key: loss_fn(params, None, key),
      dual_on=loss_fn,
    )
