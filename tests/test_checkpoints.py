"""Checkpoints resume bitwise, corrupt ones are detected, specs never mix, NaN saves nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_gate import checkpoints, train
from robust_gate.checks import InputError

K = 3


def _loss_fn(params, batch, key):
  del batch
  noise = 0.1 * jax.random.normal(key, params["w"].shape)
  targets = jnp.arange(K, dtype=jnp.float32)[:, None] * jnp.ones((K, 4))
  return jnp.sum((params["w"][None] + noise[None] - targets[:, None]) ** 2, axis=(1, 2))


def _game():
  params = {"w": jnp.zeros((2, 4))}
  return train.make_game(_loss_fn, params, num_domains=K, lr=0.05, dual_lr=0.2, seed=3)


def _fit(directory, steps, spec=None, log=None):
  step, state = _game()
  ckpt = checkpoints.Checkpointer(
    str(directory), spec or {"a": 1}, name="toy", log=log or (lambda s: None)
  )
  return train.fit(
    step, state, steps, name="toy", log=log or (lambda s: None), chunk=10, checkpointer=ckpt
  )


def _equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _fit(tmp_path_factory.mktemp("ref"), 50)


def test_interrupted_run_resumes_bitwise(tmp_path, reference):
  _fit(tmp_path, 20)  # "killed" after step 20
  logs = []
  state, hist = _fit(tmp_path, 50, log=logs.append)
  assert any("resumed at step 20" in s for s in logs)
  assert _equal(state, reference[0])  # params, optimizer, λ, λ̄, key, step
  for k in reference[1]:  # the history spans both runs
    np.testing.assert_array_equal(hist[k], reference[1][k])
  rows = checkpoints.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, 51))


def test_more_steps_extend_a_finished_run(tmp_path, reference):
  _fit(tmp_path, 30)
  state, _ = _fit(tmp_path, 50)
  assert _equal(state, reference[0])


def test_corrupt_checkpoint_is_reported_and_the_previous_used(tmp_path, reference):
  _fit(tmp_path, 30)
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [20, 30]
  for f in (ckpts / "30").rglob("*"):  # damage every data file of the newest
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\x00garbage" + f.read_bytes()[8:])
  logs = []
  state, hist = _fit(tmp_path, 50, log=logs.append)
  assert any("checkpoint at step 30 is corrupt" in s for s in logs), logs
  assert any("resumed at step 20" in s for s in logs)
  moved = [p.name for p in (tmp_path / "corrupt").iterdir()]  # moved aside, not deleted
  assert len(moved) == 1 and moved[0].startswith("30-"), moved
  assert _equal(state, reference[0])
  np.testing.assert_array_equal(hist["lam"], reference[1]["lam"])


def test_torn_metric_lines_are_dropped(tmp_path, reference):
  _fit(tmp_path, 20)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 21, "losses": [0, 0, 0]}) + "\n" + '{"step": 22, "los')
  _, hist = _fit(tmp_path, 50)
  np.testing.assert_array_equal(hist["losses"], reference[1]["losses"])


def test_a_directory_from_another_config_is_refused(tmp_path):
  _fit(tmp_path, 10, spec={"lr": 0.05})
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  with pytest.raises(InputError, match=r"different configuration.*lr: saved 0.05, now 0.1"):
    _fit(tmp_path, 20, spec={"lr": 0.1})
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_reading_a_phase_that_never_ran_is_a_clear_error(tmp_path):
  with pytest.raises(InputError, match="nothing trained"):
    checkpoints.Checkpointer(str(tmp_path / "experts"), {}, name="experts", create=False)


def test_non_finite_loss_stops_without_overwriting_good_state(tmp_path):
  def loss_fn(params, batch, key):
    losses = _loss_fn(params, batch, key)
    return jnp.where(params["w"][0, 0] > 0.5, jnp.nan, losses)  # blows up mid-run

  params = {"w": jnp.zeros((2, 4))}
  step, state = train.make_game(loss_fn, params, num_domains=K, lr=0.05, dual_lr=0.2, seed=3)
  ckpt = checkpoints.Checkpointer(str(tmp_path), {}, name="nan", log=lambda s: None)
  with pytest.raises(FloatingPointError, match="non-finite per-domain loss or λ at step"):
    train.fit(step, state, 200, name="nan", log=lambda s: None, chunk=10, checkpointer=ckpt)
  last = max(ckpt.steps())
  good = ckpt.restore(state)
  assert int(good.step) == last and last < 200
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(good))
  rows = checkpoints.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, last + 1))  # nothing after the last good
  assert np.all(np.isfinite([r["losses"] for r in rows]))
