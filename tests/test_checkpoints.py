"""Checkpoints resume bitwise, damaged ones are moved aside (and only they), specs never
mix, NaN saves nothing, finished checkpoints outlive longer runs, damaged metric files are
announced and rebuilt."""

import dataclasses
import errno
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from robust_gate import checkpoints, train
from robust_gate.checks import InputError

K = 3


def _loss_fn(params, batch, key):
  del batch
  noise = 0.1 * jax.random.normal(key, params["w"].shape)
  targets = jnp.arange(K, dtype=jnp.float32)[:, None] * jnp.ones((K, 4))
  return jnp.sum((params["w"][None] + noise[None] - targets[:, None]) ** 2, axis=(1, 2))


def _game(lr=0.05):
  params = {"w": jnp.zeros((2, 4))}
  return train.make_game(_loss_fn, params, num_domains=K, lr=lr, dual_lr=0.2, seed=3)


def _fit(directory, steps, spec=None, log=None, lr=0.05):
  step, state = _game(lr)
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


def _steps(directory):
  return sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())


def _garble_manifests(checkpoint):  # the arrays' index: tensorstore's DATA_LOSS
  for f in checkpoint.rglob("manifest.ocdbt"):
    f.write_bytes(b"\x00garbage" + f.read_bytes()[8:])


def _other_digest(checkpoint):  # whole files, other bytes than the run saved
  (checkpoint / "meta" / "metadata").write_text(json.dumps({"digest": "0" * 40, "step": 30}))


DAMAGE = {
  "arrays": _garble_manifests,
  "metadata-missing": lambda checkpoint: (checkpoint / "state" / "_METADATA").unlink(),
  "record-not-utf8": lambda checkpoint: (checkpoint / "meta" / "metadata").write_bytes(b"\xff{"),
  "record-missing": lambda checkpoint: shutil.rmtree(checkpoint / "meta"),
  "digest": _other_digest,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_kind_of_damage_is_moved_aside_and_the_previous_used(tmp_path, damage):
  """A finished run's final checkpoint too: damaged, it is no longer the run's end."""
  _fit(tmp_path, 30)
  DAMAGE[damage](tmp_path / "checkpoints" / "30")
  logs = []
  ckpt = checkpoints.Checkpointer(str(tmp_path), {"a": 1}, name="toy", log=logs.append)
  assert int(ckpt.restore(_game()[1]).step) == 20
  assert any("toy: checkpoint at step 30 is corrupt" in s for s in logs), logs
  assert [p.name[:3] for p in (tmp_path / "corrupt").iterdir()] == ["30-"]
  assert _steps(tmp_path) == [20]


@pytest.mark.parametrize(
  "params, difference",
  [
    ({"w": jnp.zeros((2, 4), jnp.int32)}, "params.w: saved float32[2, 4], now int32[2, 4]"),
    ({"w": jnp.zeros((2, 4)), "b": jnp.zeros(3)}, "params.b: saved absent, now float32[3]"),
  ],
  ids=["dtype", "leaf"],
)
def test_a_state_of_another_structure_is_one_line_and_moves_nothing(tmp_path, params, difference):
  """Other code's checkpoints (a changed GameState or parameter dtype) are not damaged:
  the finished run's checkpoints stay where they are."""
  _fit(tmp_path, 30)
  like = dataclasses.replace(_game()[1], params=params)
  ckpt = checkpoints.Checkpointer(str(tmp_path), {"a": 1}, name="toy", log=pytest.fail)
  with pytest.raises(InputError) as info:
    ckpt.restore(like)
  message = str(info.value)
  assert "\n" not in message and difference in message
  assert message.startswith(f"toy: the checkpoint at step 30 in {tmp_path} holds a state of")
  assert (
    f"It is left as it is: run that code, use another --workdir, or delete {tmp_path}" in message
  )
  assert _steps(tmp_path) == [20, 30] and not (tmp_path / "corrupt").exists()


def _raised_from(cause):
  """An error re-raised from `cause`, as orbax re-raises tensorstore's read errors."""
  try:
    raise Exception("Encountered error while reading array index: ().") from cause
  except Exception as e:
    return e


@pytest.mark.parametrize(
  "error",
  [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4.00GiB."),
    MemoryError(),
    OSError(errno.EIO, "Input/output error"),
    _raised_from(ValueError("RESOURCE_EXHAUSTED: the byte limit of reads is exceeded")),
  ],
  ids=["device-oom", "host-oom", "EIO", "tensorstore-resource"],
)
def test_a_failure_without_damage_propagates_and_moves_nothing(tmp_path, monkeypatch, error):
  _fit(tmp_path, 30)
  restore = ocp.CheckpointManager.restore

  def failing(self, step, *, args):
    if "state" in args:
      raise error
    return restore(self, step, args=args)

  ckpt = checkpoints.Checkpointer(str(tmp_path), {"a": 1}, name="toy", log=pytest.fail)
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "restore", failing)
    with pytest.raises(type(error)) as info:
      ckpt.restore(_game()[1])
  assert info.value is error
  assert _steps(tmp_path) == [20, 30] and not (tmp_path / "corrupt").exists()
  assert int(ckpt.restore(_game()[1]).step) == 30  # the error gone, the final one restores


def test_torn_metric_lines_are_dropped_and_announced(tmp_path, reference):
  _fit(tmp_path, 20)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 21, "losses": [0, 0, 0]}) + "\n" + '{"step": 22, "los')
  logs = []
  _, hist = _fit(tmp_path, 50, log=logs.append)
  assert any("dropped 1 unreadable line(s)" in s for s in logs), logs
  np.testing.assert_array_equal(hist["losses"], reference[1]["losses"])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # one row per step
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 51))


def test_a_finished_checkpoint_outlives_a_longer_run(tmp_path, reference):
  """30 steps, extended to 50, then asked for 30 again: the checkpoint that ended the
  30-step run is kept, and restored, not refused as behind the newest."""
  thirty = _fit(tmp_path / "ref30", 30)
  _fit(tmp_path / "run", 30)
  state, _ = _fit(tmp_path / "run", 50)
  assert _equal(state, reference[0])
  assert _steps(tmp_path / "run") == [30, 40, 50]  # 30 ended a run; 40 is 50's fallback
  logs = []
  state, hist = _fit(tmp_path / "run", 30, log=logs.append)
  assert "toy: resumed at step 30" in "\n".join(logs) and "step 40/" not in "\n".join(logs)
  assert _equal(state, thirty[0])
  np.testing.assert_array_equal(hist["lam"], thirty[1]["lam"])
  assert _steps(tmp_path / "run") == [30, 40, 50]  # the longer run's checkpoints untouched
  assert len(checkpoints.read_metrics(str(tmp_path / "run"))) == 50


def test_steps_behind_every_checkpoint_are_refused(tmp_path):
  _fit(tmp_path, 30)
  with pytest.raises(InputError, match=r"at steps \[20, 30\], all past the 10 steps"):
    _fit(tmp_path, 10)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbled"])
def test_lost_metric_rows_are_announced_and_rebuilt_by_replay(tmp_path, damage):
  """The replay from the initial state reproduces the checkpoint's digest, so the
  rows it recomputes are the lost ones: the file ends as it was."""
  _fit(tmp_path, 30)
  path = tmp_path / "metrics.jsonl"
  original = path.read_text()
  lines = original.splitlines(keepends=True)
  if damage == "deleted":
    path.unlink()
    lost = "1–30"
  elif damage == "truncated":
    path.write_text("".join(lines[:12]) + lines[12][:9])
    lost = "13–30"
  else:
    path.write_text("".join(lines[:4]) + "\x00\x00garbage\n" + "".join(lines[5:]))
    lost = "5"
  logs = []
  _fit(tmp_path, 30, log=logs.append)
  assert any(f"lacks the metric rows of steps {lost} of the checkpoint's 30" in s for s in logs)
  assert any("rebuilt steps 1–30" in s for s in logs), logs
  assert path.read_text() == original


def test_a_replay_that_differs_is_not_trusted(tmp_path):
  """Rows are rebuilt only from a replay that reproduced the checkpoint: one that
  differs (here another learning rate) leaves the gap, announced."""
  _fit(tmp_path, 30)
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))
  logs = []
  _, hist = _fit(tmp_path, 30, log=logs.append, lr=0.07)
  assert any("the replay did not reproduce the checkpoint at step 30" in s for s in logs), logs
  assert len(hist["lam"]) == 10  # the history holds the rows there are
  assert [r["step"] for r in checkpoints.read_metrics(str(tmp_path))] == list(range(1, 11))


@pytest.mark.parametrize(
  "content", ['{"a": 1', "", "\x00\x00\x00", "[1, 2]"], ids=["torn", "empty", "zeros", "list"]
)
def test_a_damaged_spec_is_one_line_naming_it(tmp_path, content):
  _fit(tmp_path, 10)
  (tmp_path / "spec.json").write_text(content)
  with pytest.raises(InputError) as info:
    _fit(tmp_path, 20)
  message = str(info.value)
  assert f"{tmp_path / 'spec.json'} is damaged" in message and "\n" not in message
  assert f"delete {tmp_path} to train toy again" in message
  assert _steps(tmp_path) == [10]


def test_checkpoints_without_a_spec_are_not_trusted(tmp_path):
  _fit(tmp_path, 10)
  (tmp_path / "spec.json").unlink()
  with pytest.raises(InputError, match=r"holds toy checkpoints but no spec\.json"):
    _fit(tmp_path, 20)
  assert not (tmp_path / "spec.json").exists() and _steps(tmp_path) == [10]


def test_quarantined_checkpoints_are_reported_when_opened(tmp_path):
  _fit(tmp_path, 20)
  (tmp_path / "corrupt" / "20-20240101-000000").mkdir(parents=True)
  logs = []
  _fit(tmp_path, 20, log=logs.append)
  assert f"toy: {tmp_path / 'corrupt'} holds 1 quarantined checkpoint(s)" in logs[0]


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
  with pytest.raises(FloatingPointError) as info:
    train.fit(step, state, 200, name="nan", log=lambda s: None, chunk=10, checkpointer=ckpt)
  last = max(ckpt.steps())
  message = str(info.value)
  assert "\n" not in message and message.startswith("nan diverged: non-finite")
  assert f"its checkpoint at step {last}, the last good one, is kept" in message
  assert "lower the learning rate of nan" in message
  good = ckpt.restore(state)
  assert int(good.step) == last and last < 200
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(good))
  rows = checkpoints.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, last + 1))  # nothing after the last good
  assert np.all(np.isfinite([r["losses"] for r in rows]))


def test_a_refusal_names_each_nested_field_that_differs(tmp_path):
  _fit(tmp_path, 10, spec={"distill": {"lr": 0.5}, "seed": 0})
  with pytest.raises(
    InputError,
    match=r"\(distill\.lr: saved 0\.5, now 0\.25; "
    r"distill\.weights: saved \(absent\), now 'uniform'\)",
  ):
    _fit(tmp_path, 20, spec={"distill": {"lr": 0.25, "weights": "uniform"}, "seed": 0})
