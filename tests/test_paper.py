"""Issue 8's experiments (robust_gate.paper) on a tiny main job: they run, and what
can be checked exactly is (grid maxima, λ̄-losses, the §3 identity, warm starts)."""

import copy
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from tolerances import F32_RTOL

from robust_gate import config_files, models, paper, pipeline, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "launch", "configs")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  # The compilation cache the launcher tests share (tests/test_pipeline.py).
  jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"robust_gate_jax_cache_{os.getuid()}"),
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
  workdir = str(tmp_path_factory.mktemp("paper"))
  pipeline.run(config, workdir, log=lambda s: None)
  return config, workdir


def test_the_reported_gate_is_an_average_and_normalized(tiny):
  """The main job reports the EMA of the robust gate's parameters: not the last iterate,
  and a causal gated model whose every next-token conditional sums to 1 (G_1)."""
  config, workdir = tiny
  m = pipeline.load_models(config, workdir, log=lambda s: None)
  robust = m.gates.robust_gate
  assert config.gate.ema_decay > 0
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree_util.tree_leaves(robust.params), jax.tree_util.tree_leaves(robust.state.params)
    )
  )
  next_fn = sampling.gated_next_fn(m.experts.lm_cfg, m.experts.params, robust.cfg, robust.params)
  logp_BxTxV = np.asarray(next_fn(m.splits.test.inputs_NxT[:16]), np.float64)
  np.testing.assert_allclose(np.exp(logp_BxTxV).sum(-1), 1.0, atol=1e-5)


def test_simplex_grid_is_every_lattice_point_once():
  g = paper.simplex_grid(4, 3)
  assert len(g) == math.comb(3 + 3, 3)
  np.testing.assert_allclose(g.sum(1), 1.0)
  assert len({tuple(r) for r in g}) == len(g) and g.min() >= 0


def test_mixtures_grid_worst_is_the_simplex_worst(tiny):
  config, workdir = tiny
  out = paper.mixtures(config, workdir, log=lambda s: None, resolution=3)
  results = json.loads(pathlib.Path(workdir, "results.json").read_text())
  lam = np.array(list(results["lambda_bar"].values()))
  for name, m in out["methods"].items():
    L = np.array(list(results["methods"][name]["domain_loss"].values()))
    assert m["grid_worst"] == pytest.approx(L.max(), rel=F32_RTOL)  # the vertices are on the grid
    assert m["at_lambda_bar"] == pytest.approx(lam @ L, rel=F32_RTOL)
    assert m["grid_mean"] <= m["grid_worst"] + 1e-12
  assert out["methods"]["robust_gate"]["gap_to_robust_worst"] == 0.0
  assert os.path.exists(os.path.join(workdir, "paper", "mixtures.png"))


def test_jsd_is_zero_for_identical_domains_and_positive_otherwise():
  options = {"num_domains": 3, "num_states": 3, "seq_len": 4}
  lam = np.array([0.2, 0.3, 0.5])
  _, _, same = paper._enumerate_markov({**options, "similarity": 1.0})
  _, _, diverse = paper._enumerate_markov({**options, "similarity": 0.0})
  assert abs(paper.markov_jsd(same, lam)) < 1e-6
  assert paper.markov_jsd(diverse, lam) > 1e-2
  assert paper.markov_jsd(diverse, lam) <= -(lam * np.log(lam)).sum()  # ≤ H(λ)
  np.testing.assert_allclose(np.exp(diverse).sum(1), 1.0)  # every sequence enumerated


def test_jsd_identity_holds_exactly_for_the_trained_models(tiny):
  config, workdir = tiny  # Markov domains: 4 states, 6 tokens, 4096 sequences
  run = paper.jsd_point(config, workdir, log=lambda s: None)
  assert run["jsd_lambda_bar_bits_per_token"] > 0
  for m in run["models"].values():
    assert abs(m["identity_residual_nats"]) < 1e-6
    assert min(m["exact_L_bits_per_token"]) >= -1e-9  # exact KLs of a normalized model
    assert 0 < m["mass_on_length_T"] <= 1 + 1e-6
    assert m["linearized_at_lambda_bar"] >= run["jsd_lambda_bar_bits_per_token"] - 1e-9


def test_expanded_gate_keeps_the_old_experts_relative_weights():
  K, V, T = 3, 7, 5
  old_cfg = models.GateConfig(num_experts=K - 1, vocab_size=V, max_len=T)
  new_cfg = models.GateConfig(num_experts=K, vocab_size=V, max_len=T)
  old = models.init_gate(old_cfg, jax.random.PRNGKey(0))
  warm = paper.expand_gate(old, models.init_gate(new_cfg, jax.random.PRNGKey(1)))
  x = jax.random.randint(jax.random.PRNGKey(2), (4, T), 0, V)
  prefix = -jax.random.uniform(jax.random.PRNGKey(3), (4, T, K)) * 5
  lo = models.gate_log_weights(old_cfg, old, x, prefix[..., : K - 1])
  ln = models.gate_log_weights(new_cfg, warm, x, prefix)
  renorm = ln[..., : K - 1] - jax.nn.logsumexp(ln[..., : K - 1], -1, keepdims=True)
  np.testing.assert_allclose(renorm, lo, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(ln, -1), 0.0, atol=1e-5)  # in G_1


@pytest.mark.parametrize("name", ["conflict", "gate_size", "prior", "extend", "prune", "ema"])
def test_experiment_runs_and_reports_finite_numbers(tiny, name):
  config, workdir = tiny
  kwargs = {
    "gate_size": {"hiddens": (4, 16), "fractions": (0.5, 1.0)},
    "conflict": {"points": 3},
    "ema": {"decays": (config.gate.ema_decay, 0.0), "seeds": (0, 1), "points": 4},
  }.get(name, {})
  config = copy.deepcopy(config)
  out = paper.EXPERIMENTS[name](config, workdir, log=lambda s: None, **kwargs)
  flat = json.dumps(out)
  assert "NaN" not in flat and "Infinity" not in flat
  assert os.path.exists(os.path.join(workdir, "paper", f"{name}.png"))
  if name == "conflict":
    for r in out["models"].values():
      for c in r["matrices"]:
        np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-5)
  if name == "prior":
    for r in out["trained_on"].values():  # the simplex contains box and KL ball
      assert r["worst_in_simplex"] >= max(r["worst_in_box"], r["worst_in_kl_ball"]) - 1e-6
  if name == "prune":
    assert len(out["path"]) == 3 and out["path"][-1]["expert_flops_per_token"] == pytest.approx(
      out["path"][0]["expert_flops_per_token"] / 3
    )
  if name == "ema":  # the config's decay and seed refit the main job's robust gate
    results = json.loads(pathlib.Path(workdir, "results.json").read_text())
    averaged, last = out["runs"][:2]
    assert averaged["test_worst_final"] == pytest.approx(
      results["methods"]["robust_gate"]["worst_case"], rel=1e-5
    )
    assert last["test_worst_final"] != pytest.approx(averaged["test_worst_final"], rel=1e-5)
