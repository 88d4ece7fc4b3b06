"""robust_gate.parallel: the mesh, batches split, state replicated, arrays fetched whole.

With 8 simulated CPU devices. XLA_FLAGS must be set before jax initializes its
backend, and this test process's jax is already up with one device, so the
8-device checks run in one subprocess (`_CHILD`) that reports what it observed as
JSON; the tests assert on that. The single-process facts (`is_main`, `sync`) are
checked here.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from devices import env_with_devices

from robust_gate import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import data, models, parallel, train
from robust_gate.checks import InputError

out = {"device_count": jax.device_count()}
m = parallel.mesh()
out["mesh"] = {"axis_names": list(m.axis_names), "shape": dict(m.shape)}

x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
xd = parallel.put(x)
out["put_spec"] = [str(a) for a in xd.sharding.spec]
out["put_shards"] = sorted(
  (s.index[0].start, s.index[0].stop, s.data.shape[0], bool(np.array_equal(s.data, x[s.index])))
  for s in xd.addressable_shards
)
out["put_devices"] = len({s.device for s in xd.addressable_shards})
out["fetch_equal"] = bool(np.array_equal(parallel.fetch(xd), x))
out["fetch_type"] = type(parallel.fetch(xd)).__name__

y = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)
yd = parallel.put(y, axis=1)
out["put_axis1_spec"] = [str(a) for a in yd.sharding.spec]
out["put_axis1_shard_shapes"] = sorted({tuple(s.data.shape) for s in yd.addressable_shards})
out["put_axis1_fetch_equal"] = bool(np.array_equal(parallel.fetch(yd), y))

state = {"w": np.ones((4, 5), np.float32), "lam": np.full(3, 1 / 3, np.float32)}
rd = parallel.replicate(state)
out["replicated"] = {
  k: [v.sharding.is_fully_replicated, sorted({s.data.shape for s in v.addressable_shards})]
  for k, v in rd.items()
}
out["replicated_fetch_equal"] = all(np.array_equal(parallel.fetch(rd[k]), state[k]) for k in state)

# Inside jit: shard_batch splits along the axis asked for; the sums match the host's.
f = jax.jit(lambda a: parallel.shard_batch(a * 2.0))
out["shard_batch_shards"] = sorted(
  (s.index[0].start, s.data.shape) for s in f(jnp.asarray(x)).addressable_shards
)
sums = jax.jit(lambda a: jnp.sum(parallel.shard_batch(a), axis=0))(jnp.asarray(x))
out["sharded_sum"] = parallel.fetch(sums).tolist()

rows, n = parallel.put_rows(x[:13], np.arange(13))
out["put_rows"] = [n, [list(r.shape) for r in rows]]
out["put_rows_fetch_equal"] = bool(np.array_equal(parallel.fetch(rows[0])[:n], x[:13]))
out["put_rows_padding"] = parallel.fetch(rows[1])[n:].tolist()

errors = {}
for what, fn in {
  "check_divisible": lambda: parallel.check_divisible(12, "per_domain"),
  "expert_loss_fn": lambda: train.expert_loss_fn(
    models.LMConfig(vocab_size=3, max_len=4, d_model=8, num_layers=1, num_heads=2, d_ff=8),
    data.encode([np.array([1, 2])] * 4, np.array([0, 1, 0, 1]), ["a", "b"], 3, 4),
    12,
  ),
}.items():
  try:
    fn()
    errors[what] = None
  except InputError as e:
    errors[what] = str(e)
out["errors"] = errors
parallel.check_divisible(16, "per_domain")
out["is_main"] = parallel.is_main()
parallel.sync("test")  # a no-op in one process
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
  env = env_with_devices(8)
  out = subprocess.run(
    [sys.executable, "-c", _CHILD],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_mesh_spans_every_device_on_one_data_axis(eight):
  assert eight["device_count"] == 8
  assert eight["mesh"] == {"axis_names": ["data"], "shape": {"data": 8}}


def test_put_splits_a_batch_along_its_batch_axis(eight):
  assert eight["put_spec"] == ["data", "None"]
  assert eight["put_devices"] == 8
  # Device i holds rows 2i, 2i+1, and they are the host's rows.
  assert eight["put_shards"] == [[2 * i, 2 * i + 2, 2, True] for i in range(8)]
  assert eight["put_axis1_spec"] == ["None", "data"]
  assert eight["put_axis1_shard_shapes"] == [[3, 2]]
  assert eight["put_axis1_fetch_equal"] is True
  assert eight["shard_batch_shards"] == [[2 * i, [2, 3]] for i in range(8)]  # inside jit
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  assert eight["sharded_sum"] == x.sum(axis=0).tolist() == [360.0, 376.0, 392.0]


def test_state_is_replicated_whole_on_every_device(eight):
  assert eight["replicated"] == {"w": [True, [[4, 5]]], "lam": [True, [[3]]]}
  assert eight["replicated_fetch_equal"] is True


def test_fetch_returns_the_full_array(eight):
  assert eight["fetch_equal"] is True
  assert eight["fetch_type"] == "ndarray"


def test_put_rows_pads_to_a_multiple_of_the_devices(eight):
  assert eight["put_rows"] == [13, [[16, 3], [16]]]
  assert eight["put_rows_fetch_equal"] is True
  assert eight["put_rows_padding"] == [0, 0, 0]


def test_a_batch_that_does_not_divide_is_an_input_error(eight):
  assert eight["errors"] == {
    "check_divisible": "per_domain=12 does not divide across the 8 devices; use a "
    "multiple of 8 (batch sizes are global, split over devices).",
    "expert_loss_fn": "per_domain (experts)=12 does not divide across the 8 devices; use a "
    "multiple of 8 (batch sizes are global, split over devices).",
  }


def test_is_main_is_process_zero(eight, monkeypatch):
  assert eight["is_main"] is True
  assert parallel.is_main() is True
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert parallel.is_main() is False


def test_one_device_put_and_fetch_round_trip():
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_array_equal(parallel.fetch(parallel.put(x)), x)
  assert parallel.mesh().shape == {"data": jax.device_count()}
