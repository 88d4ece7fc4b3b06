"""The paper's experiments (robust_gate.experiments) on a tiny main job: each runs,
writes its JSON (with provenance, its seeds and mean ± sd over them) and PNG, and what
can be checked exactly is (grid maxima, λ̄-losses, the §3 identity, warm starts, the
pruning path chosen on validation, the EMA refit, weak duality along the game)."""

import dataclasses
import glob
import itertools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import traceback

import jax
import numpy as np
import pytest
from test_pipeline import ENV
from tolerances import F32_RTOL

from robust_gate import config_files, evaluate, models, pipeline, provenance, sampling
from robust_gate.checks import InputError
from robust_gate.experiments import (
  EXPERIMENTS,
  common,
  convergence,
  extend,
  jsd,
  mixtures,
  parse_settings,
  prune,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "launch", "configs")
QUIET = lambda s: None
# Seeds the experiments repeat their training over here: fewer than the launcher's
# (`test_the_launcher_repeats_every_experiment_over_at_least_three_seeds`), to stay fast.
TEST_SEEDS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, finished_tiny_job):
  """(config, workdir): a copy of the finished tiny main job every file shares
  (conftest.py), which the experiments write into."""
  config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
  workdir = str(shutil.copytree(finished_tiny_job[0], tmp_path_factory.mktemp("e") / "tiny"))
  config.experiment_seeds = TEST_SEEDS
  return config, workdir


def _results(workdir) -> dict:
  return json.loads(pathlib.Path(workdir, "results.json").read_text())


# What this file's tests run each experiment with: its keyword arguments.
def _settings(config) -> dict[str, dict]:
  return {
    "mixtures": dict(resolution=3),
    "conflict": dict(points=3),
    "jsd": dict(similarities=(1.0,)),
    "gate_size": dict(hiddens=(4, 16), fractions=(0.5, 1.0)),
    "prior": {},
    "extend": {},
    "prune": {},  # on a test split made worse for one expert (`_worse_test_for_prune`)
    "ema": dict(decays=(config.gate.ema_decay, 0.0), points=4),
    "convergence": dict(points=4),
    "sequence_gate": dict(train_samples=64, eval_samples=256, distill_samples=64),
  }


def _worse_test_for_prune(config, workdir, monkeypatch) -> dict:
  """Makes `common.load` return the tiny job with one expert other than validation's
  least used explaining test 20 nats per token worse, so that test usage (and
  results.json's, recomputed on that test) puts it last; what the prune test checks
  against: validation's usage, that expert, the domains, test's least used expert."""
  results, m = common.load(config, workdir)
  gate = m.gates.robust_gate
  on_validation = prune.expert_mass(gate, common.gate_data(m.caches).selection)
  unused = (int(np.argmin(on_validation)) + 1) % 3  # unused on test only
  te = m.caches.test
  worse_M = np.where(np.arange(3) == unused, 20.0, 0.0).astype(te.cache_NxTxM.dtype)
  test = dataclasses.replace(te, cache_NxTxM=te.cache_NxTxM - worse_M)
  results["gate_usage"]["robust_gate"] = evaluate.gate_logprobs_and_usage(
    gate.cfg, gate.params, test.data, test.cache_NxTxM
  )[1].tolist()
  changed = dataclasses.replace(m, caches=dataclasses.replace(m.caches, test=test))
  monkeypatch.setattr(common, "load", lambda config, workdir: (results, changed))
  return {
    "on_validation": np.asarray(on_validation).tolist(),
    "unused": unused,
    "names": list(test.data.domains),
    "least_used_on_test": int(np.argmin(prune.expert_mass(gate, test))),
  }


def run_here(workdir: str, seeds: int, runs: dict[str, dict]) -> dict[str, dict]:
  """Runs each experiment of `runs` ({name: keyword arguments}) in this process, one
  after the other, on the tiny config with `seeds` seeds; {name: {"error": its traceback
  or None, "prune": what `_worse_test_for_prune` returned}}. Checks that each JSON
  written is what the experiment returned and that the caller's config is unchanged. A
  name `_<test>` is that test's body, called with the config and workdir."""
  done = {}
  for name, kwargs in runs.items():
    config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
    config.experiment_seeds = seeds
    done[name] = {"error": None}
    try:
      if name.startswith("_"):
        globals()[name](config, workdir)
        continue
      with pytest.MonkeyPatch.context() as mp:
        if name == "prune":
          done[name]["prune"] = _worse_test_for_prune(config, workdir, mp)
        before = repr(config.to_dict())
        out = EXPERIMENTS[name](config, workdir, log=QUIET, **kwargs)
      with open(os.path.join(workdir, "experiments", name + ".json")) as f:
        assert json.load(f) == json.loads(json.dumps(out)), "the JSON is not what it returned"
      assert repr(config.to_dict()) == before, "the experiment changed its caller's config"
    except Exception:  # pylint: disable=broad-except  # reported by the experiment's test
      done[name]["error"] = traceback.format_exc()
  return done


_CHILD_ALL = f"""
import ast, json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_experiments import run_here
print(json.dumps(run_here(sys.argv[1], int(sys.argv[2]), ast.literal_eval(sys.argv[3]))))
"""


@pytest.fixture(scope="module")
def ran(tiny, request):
  """Every experiment a selected test of this file reads, run as `_settings` says, one
  after the other in one process of their own (one start and one jax import for all; it
  reads the tiny job's programs from the shared compilation cache), after the test
  bodies here that restore models (_BODIES); `run_here`'s record of them."""
  config, workdir = tiny
  selected = [item.name for item in request.session.items if item.path == request.path]
  runs = {
    name: kwargs
    for name, kwargs in _settings(config).items()
    if any(t.startswith(f"test_{name}_") for t in selected)
  }
  runs = {**{body: {} for body in _BODIES if f"test{body}" in selected}, **runs}
  command = [sys.executable, "-c", _CHILD_ALL, workdir, str(config.experiment_seeds), repr(runs)]
  child = subprocess.run(command, capture_output=True, text=True, timeout=1100, env=ENV)
  assert child.returncode == 0, child.stderr[-3000:]
  return json.loads(child.stdout.strip().splitlines()[-1])


# The bodies of this file's tests that restore the tiny job's models: `ran` runs them
# first, where the programs that restoring compiles are the cache's.
_BODIES = (
  "_the_reported_gate_is_an_average_and_normalized",
  "_jsd_identity_holds_exactly_for_the_trained_models",
)


def _passed(ran, body) -> None:
  """Fails with its traceback unless test body `body` ran in `ran`'s process and passed."""
  assert body in ran, f"{body} did not run"
  assert ran[body]["error"] is None, ran[body]["error"][-3000:]


def _ran(tiny, ran, name) -> dict:
  """The JSON experiment `name` wrote when `ran` ran it, checked as every experiment's is."""
  _passed(ran, name)
  return _written(tiny, name)


def _written(tiny, name) -> dict:
  """The JSON experiment `name` wrote in the tiny job's workdir, checked as every
  experiment's is."""
  config, workdir = tiny
  written = json.loads(pathlib.Path(workdir, "experiments", f"{name}.json").read_text())
  assert written["experiment"] == name
  assert written["provenance"]["config"]["seed"] == config.seed
  assert written["provenance"]["commit"] and written["provenance"]["platform"] == "cpu"
  if name != "jsd":  # what it read: the main job's models and its results.json
    inputs = written[provenance.INPUTS_KEY]
    assert list(inputs) == [*provenance.MODEL_DIRS, "results.json"]
    assert inputs["results.json"] == [_results(workdir)["provenance"]]
  flat = json.dumps(written)
  assert "NaN" not in flat and "Infinity" not in flat
  if name == "mixtures":  # it trains nothing: the main job's one run, and it says so
    assert written["seeds"] == [config.seed] and written["seeds_note"].startswith("1 seed")
  else:
    assert written["seeds"] == common.seeds(config) and len(written["seeds"]) >= TEST_SEEDS
    assert written["seeds_note"]
    found = list(_spreads(written))
    assert found, f"{name} reports no mean ± sd"
    for s in found:  # a mean and sample sd of its per-seed values, one per seed
      per_seed = np.asarray(s["per_seed"])
      assert len(per_seed) == len(written["seeds"])
      np.testing.assert_allclose(s["mean"], per_seed.mean(0), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(s["sd"], per_seed.std(0, ddof=1), rtol=1e-12, atol=1e-12)
  assert pathlib.Path(workdir, "experiments", f"{name}.png").stat().st_size > 1000
  return written


def _spreads(tree):
  """Every {"mean", "sd", "per_seed"} record in a JSON tree."""
  if isinstance(tree, dict):
    if set(tree) == {"mean", "sd", "per_seed"}:
      yield tree
      return
    tree = list(tree.values())
  if isinstance(tree, list):
    for v in tree:
      yield from _spreads(v)


def test_the_launcher_repeats_every_experiment_over_at_least_three_seeds():
  """Every main-job config the launcher reads gives ≥ 3 seeds (the tests use fewer)."""
  paths = sorted(glob.glob(os.path.join(CONFIGS, "*.py")))
  configs = [c for c in map(config_files.load, paths) if "gate" in c and "expert" in c]
  assert len(configs) >= 5
  for config in configs:
    seeds = common.seeds(config)
    assert len(seeds) >= 3 and seeds[0] == config.seed and len(set(seeds)) == len(seeds)
  config = config_files.load(os.path.join(CONFIGS, "tiny.py"))
  config.experiment_seeds = 1
  with pytest.raises(InputError, match="experiment_seeds"):
    common.seeds(config)


def test_every_experiment_has_tests_of_its_own_here():
  """Here (test_<name>_...) or in a file of its own (tests/test_<name>.py)."""
  tests = [n for n in globals() if n.startswith("test_")]
  own_file = lambda n: os.path.exists(os.path.join(os.path.dirname(__file__), f"test_{n}.py"))
  untested = [
    n for n in EXPERIMENTS if not own_file(n) and not any(t.startswith(f"test_{n}_") for t in tests)
  ]
  assert untested == []


def test_the_reported_gate_is_an_average_and_normalized(ran):
  """The main job reports the EMA of the robust gate's parameters: not the last iterate,
  and a causal gated model whose every next-token conditional sums to 1 (G_1). (Its body
  restores the models: it runs where `ran` runs the experiments.)"""
  _passed(ran, "_the_reported_gate_is_an_average_and_normalized")


def _the_reported_gate_is_an_average_and_normalized(config, workdir):
  m = pipeline.load_models(config, workdir, log=QUIET)
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


def test_mixtures_simplex_grid_is_every_lattice_point_once():
  g = mixtures.simplex_grid(4, 3)
  assert len(g) == math.comb(3 + 3, 3)
  np.testing.assert_allclose(g.sum(1), 1.0)
  assert len({tuple(r) for r in g}) == len(g) and g.min() >= 0


def test_mixtures_grid_worst_is_the_simplex_worst(tiny, ran):
  out = _ran(tiny, ran, "mixtures")
  results = _results(tiny[1])
  lam = np.array(list(results["lambda_bar"].values()))
  for name, m in out["methods"].items():
    L = np.array(list(results["methods"][name]["domain_loss"].values()))
    assert m["grid_worst"] == pytest.approx(L.max(), rel=F32_RTOL)  # the vertices are on the grid
    assert m["at_lambda_bar"] == pytest.approx(lam @ L, rel=F32_RTOL)
    assert m["grid_mean"] <= m["grid_worst"] + 1e-12
  assert out["methods"]["robust_gate"]["gap_to_robust_worst"] == 0.0
  assert out["grid_points"] == math.comb(3 + 2, 2)  # K = 3 domains


def test_conflict_cosines_over_training(tiny, ran):
  out = _ran(tiny, ran, "conflict")
  config = tiny[0]
  assert set(out["models"]) == {"monolithic", "gate"}
  for name, steps in (("monolithic", config.monolithic.steps), ("gate", config.gate.steps)):
    r = out["models"][name]
    assert r["steps"] == [0, steps // 2, steps]
    for c in r["matrices_mean_over_seeds"]:
      np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-5)
      np.testing.assert_allclose(c, np.transpose(c), atol=1e-6)
    negative = np.array(r["negative_fraction"]["per_seed"])
    assert np.all((negative >= 0) & (negative <= 1))
    assert r["final_mean_off_diagonal"]["per_seed"] == [
      s[-1] for s in r["mean_off_diagonal"]["per_seed"]
    ]
    # The seeds train different models: their cosines differ after step 0.
    assert len({s[-1] for s in r["mean_off_diagonal"]["per_seed"]}) == TEST_SEEDS


def test_jsd_is_zero_for_identical_domains_and_positive_otherwise():
  options = {"num_domains": 3, "num_states": 3, "seq_len": 4}
  lam = np.array([0.2, 0.3, 0.5])
  _, _, same = jsd.enumerate_markov({**options, "similarity": 1.0})
  _, _, diverse = jsd.enumerate_markov({**options, "similarity": 0.0})
  assert abs(jsd.markov_jsd(same, lam)) < 1e-6
  assert jsd.markov_jsd(diverse, lam) > 1e-2
  assert jsd.markov_jsd(diverse, lam) <= -(lam * np.log(lam)).sum()  # ≤ H(λ)
  np.testing.assert_allclose(np.exp(diverse).sum(1), 1.0)  # every sequence enumerated


def test_jsd_identity_holds_exactly_for_the_trained_models(ran):
  """(Its body restores and scores the models: it runs where `ran` runs the experiments,
  on the launchers' compilation cache.)"""
  _passed(ran, "_jsd_identity_holds_exactly_for_the_trained_models")


def _jsd_identity_holds_exactly_for_the_trained_models(config, workdir):
  # Markov domains: 4 states, 6 tokens, 4096 sequences
  run = jsd.point(config, workdir, log=QUIET)
  assert run["jsd_lambda_bar_bits_per_token"] > 0
  for m in run["models"].values():
    assert abs(m["identity_residual_nats"]) < 1e-6
    assert min(m["exact_L_bits_per_token"]) >= -1e-9  # exact KLs of a normalized model
    assert 0 < m["mass_on_length_T"] <= 1 + 1e-6
    assert m["linearized_at_lambda_bar"] >= run["jsd_lambda_bar_bits_per_token"] - 1e-9


def test_jsd_run_trains_and_scores_a_main_job_per_similarity_and_seed(tiny, ran):
  """`run` at one similarity: identical domains (JSD 0), a main job of that similarity
  for each seed in `s=<s>/seed=<seed>/`, and the provenance of what it read there."""
  config, workdir = tiny
  out = _ran(tiny, ran, "jsd")
  assert out["similarities"] == [1.0] and len(out["runs"]) == 1
  row = out["runs"][0]
  assert row["similarity"] == 1.0
  assert max(map(abs, row["jsd_lambda_bar_bits_per_token"]["per_seed"])) < 1e-6
  names = [f"s=1.0/seed={seed}" for seed in out["seeds"]]
  subs = [_results(os.path.join(workdir, n)) for n in names]
  for seed, sub in zip(out["seeds"], subs):
    assert sub["provenance"]["config"]["data"]["options"]["similarity"] == 1.0
    assert sub["provenance"]["config"]["seed"] == seed
  for name, m in row["models"].items():  # each seed's sub-job's, not tiny's
    assert m["test_worst"]["per_seed"] == [sub["methods"][name]["worst_case"] for sub in subs]
    assert max(map(abs, m["identity_residual_nats"]["per_seed"])) < 1e-6
  assert len(set(row["models"]["robust_gate"]["exact_worst"]["per_seed"])) == TEST_SEEDS
  inputs = out[provenance.INPUTS_KEY]
  read = (*provenance.MODEL_DIRS, "results.json")
  assert list(inputs) == [f"{n}/{r}" for n in names for r in read]
  assert [inputs[f"{n}/results.json"] for n in names] == [[sub["provenance"]] for sub in subs]
  assert config.seed == out["seeds"][0]


def test_gate_size_runs_every_width_on_every_fraction(tiny, ran):
  out = _ran(tiny, ran, "gate_size")
  runs = {(r["hidden"], r["fraction"]): r for r in out["runs"]}
  assert set(runs) == {(4, 0.5), (16, 0.5), (4, 1.0), (16, 1.0)}
  # Validation's fit part: 3 domains × 40 sequences, half of each held out for the dual.
  assert tiny[0].gate.dual_holdout == 0.5
  assert runs[(4, 1.0)]["examples"] == 60
  assert runs[(4, 0.5)]["examples"] == 30
  assert runs[(4, 1.0)]["params"] < runs[(16, 1.0)]["params"]
  for r in out["runs"]:
    assert len(r["curves"]) == TEST_SEEDS
    assert r["test_worst_final"]["per_seed"] == [max(c[-1]["test"]) for c in r["curves"]]


def test_prior_worst_over_the_simplex_bounds_every_smaller_set(tiny, ran):
  out = _ran(tiny, ran, "prior")
  assert set(out["trained_on"]) == {"simplex", "box", "kl_ball"}
  for r in out["trained_on"].values():  # the simplex contains box and KL ball, for every seed
    within = np.maximum(r["worst_in_box"]["per_seed"], r["worst_in_kl_ball"]["per_seed"])
    assert np.all(np.array(r["worst_in_simplex"]["per_seed"]) >= within - 1e-6)


def test_extend_expanded_gate_keeps_the_old_experts_relative_weights():
  K, V, T = 3, 7, 5
  # With position and token features, which sit after the experts' rows of the first
  # kernel: a warm start that copied the old kernel's leading rows shifted them.
  gate = dict(vocab_size=V, max_len=T, pos_embed=4, token_embed=3)
  old_cfg = models.GateConfig(num_experts=K - 1, **gate)
  new_cfg = models.GateConfig(num_experts=K, **gate)
  old = models.init_gate(old_cfg, jax.random.PRNGKey(0))
  # A trained gate's corrections are not zero (init's last layer is).
  old = jax.tree_util.tree_map(
    lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(5), a.shape), old
  )
  warm = extend.expand_gate(old, models.init_gate(new_cfg, jax.random.PRNGKey(1)))
  x = jax.random.randint(jax.random.PRNGKey(2), (4, T), 0, V)
  prefix = -jax.random.uniform(jax.random.PRNGKey(3), (4, T, K)) * 5
  # The features are relative to the best expert's prefix likelihood: the old gate's
  # are unchanged where the new expert is not the best (here: the worst).
  prefix = prefix.at[..., K - 1].set(prefix.min(-1) - 1.0)
  lo = models.gate_log_weights(old_cfg, old, x, prefix[..., : K - 1])
  ln = models.gate_log_weights(new_cfg, warm, x, prefix)
  renorm = ln[..., : K - 1] - jax.nn.logsumexp(ln[..., : K - 1], -1, keepdims=True)
  np.testing.assert_allclose(renorm, lo, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(ln, -1), 0.0, atol=1e-5)  # in G_1


def test_extend_adds_the_last_domain_to_a_gate_on_the_others(tiny, ran):
  out = _ran(tiny, ran, "extend")
  assert out["new_domain"] == "chain_2" and out["old_domains"] == ["chain_0", "chain_1"]
  assert set(out["runs"]) == {"warm start", "from scratch"}
  for r in out["runs"].values():
    assert r["steps"][0] == 0 and r["steps"][-1] == tiny[0].gate.steps
    assert len(r["worst"]["mean"]) == len(r["steps"])
  # On every seed, scratch reaches its own late mean, by definition of that mean's second half.
  hits = out["runs"]["from scratch"]["first_step_at_or_below_scratch_late_mean"]
  assert len(hits) == TEST_SEEDS and None not in hits


def test_prune_path_drops_the_least_used_expert_on_validation_first(tiny, ran):
  """The order is the gate's mass on validation. Here one expert other than validation's
  least used explains test 20 nats per token worse, so that test usage (and results.json's,
  recomputed on that test) puts it last: the path must not follow test
  (`_worse_test_for_prune`, applied where `ran` runs the experiment)."""
  out = _ran(tiny, ran, "prune")
  made = ran["prune"]["prune"]
  on_validation, unused, names = made["on_validation"], made["unused"], made["names"]
  assert made["least_used_on_test"] == unused  # else this test could not fail
  path, mass = out["path"], out["mass_under_lambda_bar"]
  np.testing.assert_allclose(list(mass.values()), on_validation, rtol=F32_RTOL)
  assert "validation" in out["order_chosen_on"]
  assert [len(p["experts"]) for p in path] == [3, 2, 1]
  dropped = [next(iter(set(a["experts"]) - set(b["experts"]))) for a, b in itertools.pairwise(path)]
  assert dropped == [names[j] for j in np.argsort(on_validation)[:2]]
  assert path[-1]["expert_flops_per_token"] == pytest.approx(path[0]["expert_flops_per_token"] / 3)


def test_ema_at_the_config_decay_refits_the_main_jobs_gate(tiny, ran):
  """The config's decay and seed refit the main job's robust gate; decay 0 (the last
  iterate) reports another gate."""
  config = tiny[0]
  decays = _settings(config)["ema"]["decays"]
  assert decays == (config.gate.ema_decay, 0.0)
  out = _ran(tiny, ran, "ema")
  averaged, last = out["runs"][:2]
  assert (averaged["seed"], averaged["ema_decay"]) == (config.seed, config.gate.ema_decay)
  assert averaged["test_worst_final"] == pytest.approx(
    _results(tiny[1])["methods"]["robust_gate"]["worst_case"], rel=F32_RTOL
  )
  assert last["test_worst_final"] != pytest.approx(averaged["test_worst_final"], rel=1e-5)
  assert list(out["summary"]) == [f"decay {d}" for d in decays]
  # The choice is validation's, whatever test says.
  late = {d: out["summary"][f"decay {d}"]["validation_worst_late"]["mean"] for d in decays}
  assert out["decay_chosen_on_validation"] == min(decays, key=lambda d: late[d])


def test_convergence_lower_is_at_most_upper_at_every_point(tiny, ran):
  """Weak duality along every game, on validation and test; the constant-step game at the
  main job's seed is the main job's robust gate; the variant reported is validation's."""
  config, workdir = tiny
  out = _ran(tiny, ran, "convergence")
  curves, final = out["curves"], out["final"]
  assert curves["steps"] == [0, 10, 20, 30, 40] and set(final) == set(convergence.VARIANTS)
  for name in convergence.VARIANTS:
    for split in ("validation", "test"):
      upper, lower, gap = (np.array(curves[name][split][v]["per_seed"]) for v in convergence.VALUES)
      assert upper.shape == (TEST_SEEDS, 5)
      assert np.all(lower <= upper + 1e-6)
      np.testing.assert_allclose(gap, upper - lower, atol=1e-6)
      assert final[name][f"{split}_gap"]["per_seed"] == gap[:, -1].tolist()
  assert config.gate.dual_timescale == 0 and not config.gate.optimistic  # the main job's game
  assert final["constant"]["test_worst_case"]["per_seed"][0] == pytest.approx(
    _results(workdir)["methods"]["robust_gate"]["worst_case"], rel=F32_RTOL
  )
  for key in ("validation_gap", "validation_worst_case"):
    mean = {n: final[n][key]["mean"] for n in convergence.VARIANTS}
    assert out[f"smallest_final_{key}"] == min(mean, key=lambda n: mean[n])
  assert out["lower_is_estimate"] is True
  for name in convergence.VARIANTS:  # each seed's final lower value's gate, by name
    assert len(out["lower_gate_final"][name]) == TEST_SEEDS
    assert all(g.startswith(("EMA", "last", "best")) for g in out["lower_gate_final"][name])


def test_sequence_gate_is_scored_on_test_beside_the_causal_gate_and_its_distillation(tiny, ran):
  """At config.seed the causal gate has the main job's numbers and intervals (the same
  gate, resamples and key) and, paired with itself, exactly 0; the sequence gate's log Z
  is corrected by σ²/2 and its noise is in the sequence gate's intervals."""
  config, workdir = tiny
  out = _ran(tiny, ran, "sequence_gate")
  main = _results(workdir)["methods"]["robust_gate"]
  assert set(out["summary"]) == {"sequence_gate", "causal_gate", "distilled_gate"}
  assert [r["seed"] for r in out["per_seed"]] == common.seeds(config)
  for r in out["per_seed"]:
    for e in r["methods"].values():
      lo_hi = np.array(jax.tree_util.tree_leaves(e["intervals"])).reshape(-1, 2)
      assert list(e["domain_loss"]) == list(main["domain_loss"]) and np.all(
        lo_hi[:, 0] < lo_hi[:, 1]
      )
    zero = {"mean": [0.0] * 3, "worst_case": [0.0] * 3}
    assert r["methods"]["causal_gate"]["vs_causal_gate"] == zero
    z = r["normalizer"]
    assert z["stderr"] > 0 and z["low"] < z["log_z"] < z["high"]
    assert z["log_z"] - z["log_z_uncorrected"] == pytest.approx(z["stderr"] ** 2 / 2, rel=1e-9)
    assert 0 < r["distillation"]["effective_fraction"] <= 1
  first = out["per_seed"][0]
  fields = ("worst_case", "mean", "domain_loss", "intervals")
  leaves = lambda e: jax.tree_util.tree_leaves({f: e[f] for f in fields})
  np.testing.assert_allclose(leaves(first["methods"]["causal_gate"]), leaves(main), rtol=F32_RTOL)
  # On chains of one length (seq_len tokens and EOS) the sequence gate's worst-case interval
  # is at least as wide as log Z's interval per token.
  seq, z = first["methods"]["sequence_gate"]["intervals"]["worst_case"], first["normalizer"]
  tokens = config.data.options["seq_len"] + 1
  assert seq[1] - seq[0] > 0.99 * (z["high"] - z["low"]) / tokens / math.log(2)


def test_launcher_runs_an_experiment_by_name(tiny):
  workdir = tiny[1]
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "launch", "experiment.py"),
      "--experiment=mixtures",
      f"--workdir={workdir}",
      f"--config={os.path.join(CONFIGS, 'tiny.py')}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env=ENV,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "grid worst" in out.stdout
  written = json.loads(pathlib.Path(workdir, "experiments", "mixtures.json").read_text())
  assert written["provenance"]["command"].startswith("experiment.py --experiment=mixtures")
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "launch", "experiment.py"), "--experiment=nosuch"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and "--experiment" in out.stderr


def test_launcher_settings_are_literals_for_experiments_that_take_them():
  pairs = ["steps=100", "sizes=(1.0, 2.0)", "sources=('train',)"]
  assert parse_settings(pairs, "student_size") == {
    "steps": 100,
    "sizes": (1.0, 2.0),
    "sources": ("train",),
  }
  assert parse_settings([], "mixtures") == {}
  with pytest.raises(InputError, match="experiment mixtures takes no settings"):
    parse_settings(["steps=1"], "mixtures")
  for bad in ("steps", "=3", "steps=a b"):
    with pytest.raises(InputError, match="give NAME=VALUE"):
      parse_settings([bad], "student_size")


def test_looking_an_experiment_up_imports_its_module_and_no_other():
  """The registry lists every experiment module without importing one; a lookup imports
  that experiment (and what it imports), so its results depend on its own code only."""
  probe = (
    "import sys, json; from robust_gate.experiments import EXPERIMENTS as E; names = list(E); "
    "before = sorted(m for m in sys.modules if m.startswith('robust_gate.experiments.')); "
    "run = E['ema']; "
    "after = sorted(m for m in sys.modules if m.startswith('robust_gate.experiments.')); "
    "print(json.dumps([names, before, after, run.__module__, 'common' in E]))"
  )
  out = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=ENV
  )
  assert out.returncode == 0, out.stderr[-3000:]
  names, before, after, module, helper = json.loads(out.stdout.splitlines()[-1])
  assert {"ema", "jsd", "student_size", "student_seeds"} <= set(names) and not helper
  assert before == [] and module == "robust_gate.experiments.ema"
  assert "robust_gate.experiments.ema" in after and "robust_gate.experiments.jsd" not in after
  with pytest.raises(KeyError):
    EXPERIMENTS["reporting"]


def test_the_registry_lists_experiment_modules_only(tmp_path, monkeypatch):
  """Private, non-identifier and package entries beside the experiments are no
  experiments, membership imports nothing, and a listed module without run() is a bug."""
  from robust_gate import experiments

  for name in ("_private", "not-a-name", "norun", "works"):
    (tmp_path / f"{name}.py").write_text("def run(config, workdir, log):\n  return {}\n")
  (tmp_path / "norun.py").write_text("X = 1\n")
  (tmp_path / "subpackage").mkdir()
  (tmp_path / "subpackage" / "__init__.py").write_text("")
  monkeypatch.setattr(experiments, "__path__", [str(tmp_path)])
  monkeypatch.syspath_prepend(str(tmp_path))
  registry = experiments._Experiments()
  assert list(registry) == ["norun", "works"] and "works" in registry
  assert "_private" not in registry and "subpackage" not in registry
  monkeypatch.setattr(
    experiments.importlib, "import_module", lambda n: __import__(n.rsplit(".", 1)[-1])
  )
  assert registry["works"]({}, "", print) == {}
  with pytest.raises(TypeError, match="norun is listed as an experiment but has no run"):
    registry["norun"]
