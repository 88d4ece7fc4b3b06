"""The protocol: only the evaluation phase reads the test split, and what the duals see
is a held-out part of validation.

The training phases of the tiny job run twice, once with the test split's tokens
replaced by garbage (so that its cache and b_k differ too), in a process of their own
that reads and writes the launchers' compilation cache (tests/test_pipeline.py's ENV):
this file runs alone after the rest of the suite, whose tiny jobs compiled the same
programs, and the pytest process itself trains nothing. Every trained
model's final state (parameters, optimizer, λ, λ̄, EMA, key) and every step's metrics
must be bitwise the same. A control shows that the check can fail: with the robust
gate's dual player fed the test split instead of validation's holdout, the runs differ.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_pipeline import ENV

from robust_gate import config_files, data, experts, layout, phases, pipeline, scoring
from robust_gate.checks import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny.py")
TRAINING = ("train_experts", "train_gate", "distill_student", "train_baselines")


def _garbage_test(load_splits):
  """`pipeline.load_splits` with random tokens in place of the test split's."""

  def load(config, data_dir, log=print):
    splits = load_splits(config, data_dir, log)
    te = splits.test
    rng = np.random.default_rng(1)
    targets = np.where(te.mask_NxT, rng.integers(0, te.vocab_size, te.targets_NxT.shape), 0)
    inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    te = dataclasses.replace(
      te,
      inputs_NxT=inputs.astype(te.inputs_NxT.dtype),
      targets_NxT=targets.astype(te.targets_NxT.dtype),
    )
    return dataclasses.replace(splits, test=te)

  return load


def _leaky(score):
  """`scoring.score` whose caches hand the test split to the dual players."""

  def leaky(*args, **kwargs):
    caches = score(*args, **kwargs)
    return dataclasses.replace(caches, holdout=caches.test)

  return leaky


def _train_here(workdir, phases_run, *, garbage: bool, dual_sees_test: bool = False) -> dict:
  """Runs the pipeline phases named `phases_run` on the tiny config in `workdir`, in this
  process; {model: digest of its final GameState} for every model they trained or
  restored."""
  digests = {}
  run_or_restore, score = phases.run_or_restore, scoring.score

  def spy(game, *args, **kwargs):
    state = run_or_restore(game, *args, **kwargs)
    digests[game.name] = experts.params_fingerprint(state)
    return state

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(phases, "run_or_restore", spy)
    if garbage:
      mp.setattr(pipeline, "load_splits", _garbage_test(pipeline.load_splits))
    if dual_sees_test:  # the leak the protocol forbids
      mp.setattr(scoring, "score", _leaky(score))
    for phase in phases_run:
      getattr(pipeline, phase)(config_files.load(TINY), str(workdir), log=lambda s: None)
  return digests


# `_train_here` for each run of argv[1] (a JSON list of its keyword arguments), one after
# the other in this child: the list of their digests, printed as the last line.
_CHILD = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_protocol import _train_here
print(json.dumps([_train_here(**run) for run in json.loads(sys.argv[1])]))
"""


def _train(*runs: dict) -> list[dict]:
  """`_train_here(**run)` for each of `runs`, in order, in one process of their own."""
  runs_json = json.dumps([{**r, "workdir": str(r["workdir"])} for r in runs])
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, runs_json], capture_output=True, text=True, timeout=900, env=ENV
  )
  assert child.returncode == 0, child.stderr[-3000:]
  return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(clean workdir, garbage workdir, their digests): the training phases of the tiny
  job, with the test split as it is and with garbage in its place."""
  clean, garbage = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("garbage")
  clean_digests, garbage_digests = _train(
    dict(workdir=clean, phases_run=TRAINING, garbage=False),
    dict(workdir=garbage, phases_run=TRAINING, garbage=True),
  )
  return clean, garbage, clean_digests, garbage_digests


def test_no_training_phase_reads_the_test_split(trained):
  clean, garbage, clean_digests, garbage_digests = trained
  cache = lambda w: (w / "cache_test.npz").read_bytes()
  assert cache(clean) != cache(garbage)  # the garbage reached the job
  assert set(clean_digests) == set(layout.MODEL_DIRS)  # every trained model
  assert garbage_digests == clean_digests
  for model in layout.MODEL_DIRS:
    metrics = [(w / model / "metrics.jsonl").read_bytes() for w in (clean, garbage)]
    assert metrics[0] == metrics[1], model


def test_the_dual_players_see_a_stratified_holdout_of_validation(trained):
  clean, *_ = trained
  config = config_files.load(TINY)
  # The caches alone (load_models would restore, and compile for, every model as well).
  c = pipeline._Workdir(config, str(clean), lambda s: None).caches
  va, fit, held = c.validation, c.fit, c.holdout
  rows = lambda d: sorted(map(bytes, np.concatenate([d.inputs_NxT, d.targets_NxT], axis=1)))
  assert sorted(rows(fit.data) + rows(held.data)) == rows(va.data)  # a partition of validation
  half = np.round(config.gate.dual_holdout * va.data.counts())
  np.testing.assert_array_equal(held.data.counts(), half)
  np.testing.assert_array_equal(fit.data.counts(), va.data.counts() - half)
  for part in (fit, held):  # b_k measured on the part itself
    np.testing.assert_array_equal(
      part.baseline_K, scoring.baseline(config, part.cache_NxTxM, part.data)
    )
  duals = {  # the models whose λ moves see their own held-out losses
    model: [json.loads(line) for line in (clean / model / "metrics.jsonl").read_text().splitlines()]
    for model in ("robust_gate", "monolithic_dro")
  }
  for model, rows_ in duals.items():
    assert all(len(r["dual_losses"]) == 3 for r in rows_), model
    assert any(r["dual_losses"] != r["losses"] for r in rows_), model


def test_the_check_fails_when_a_dual_player_sees_the_test_split(trained, tmp_path):
  """The control: the same two runs of the gate phase (from the same experts), with the
  robust gate's dual fed the test split, end with different robust gates."""
  clean, garbage, clean_digests, _ = trained
  runs = []
  for name, source in (("clean", clean), ("garbage", garbage)):
    workdir = tmp_path / name
    shutil.copytree(source / "experts", workdir / "experts")
    runs.append(
      dict(
        workdir=workdir, phases_run=["train_gate"], garbage=name == "garbage", dual_sees_test=True
      )
    )
  digests = _train(*runs)
  assert digests[0]["experts"] == digests[1]["experts"] == clean_digests["experts"]
  assert digests[0]["erm_gate"] == digests[1]["erm_gate"] == clean_digests["erm_gate"]
  assert digests[0]["robust_gate"] != digests[1]["robust_gate"]


def test_the_dual_holdout_is_stratified_seeded_and_checked():
  config = config_files.load(TINY)
  domain_N = np.repeat(np.arange(3), [10, 7, 4])
  d = data.encode(
    [np.array([1, 2])] * len(domain_N), domain_N, ["a", "b", "c"], vocab_size=3, max_len=4
  )
  held_N = scoring.dual_holdout(config, d)
  np.testing.assert_array_equal(np.bincount(domain_N[held_N]), [5, 4, 2])  # round(n_k / 2)
  np.testing.assert_array_equal(scoring.dual_holdout(config, d), held_N)  # deterministic
  config.seed += 1
  assert not np.array_equal(scoring.dual_holdout(config, d), held_N)  # drawn from the seed
  config.gate.dual_holdout = 0.0
  assert not scoring.dual_holdout(config, d).any()  # the in-sample dual
  config.gate.dual_holdout = 0.9
  with pytest.raises(InputError, match=r"holds out 4 of domain c's 4 validation sequences"):
    scoring.dual_holdout(config, d)
