"""robust_gate.hf.sharding: checkpoint experts' parameters split over a mesh's model axis.

On 8 simulated CPU devices, split 1, 2, 4 and 8 ways, a group of a GPT-2 and two
Llamas (tests/fixtures/hf) gives the cache that one device's `experts.build_cache`
gives, to float32 rounding, while each device holds about 1/model_parallel of the
parameters; the checkpoint job run with `--config.model_parallel=4` writes the caches
one device writes. Distillation from a teacher split 2 and 4 ways takes the steps it
takes with the teacher whole on every device, each device passed about 1/model_parallel
of the teacher. XLA_FLAGS must be set before jax starts its backend, and this
process's jax already runs on one device, so the 8-device runs are subprocesses that
write what they measured into a directory; the tests compare it with this process.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from devices import env_with_devices
from jax.sharding import PartitionSpec as P

import robust_gate.hf as hf
from robust_gate import checkpoint_data, checkpoint_job, config_files, experts
from robust_gate.checks import InputError
from robust_gate.hf import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests/fixtures/hf")
PATHS = {n: os.path.join(FIXTURES, n) for n in ("gpt2", "llama_tied", "llama_untied")}
TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox.", "import os", "Hello world."]
SPLITS = (1, 2, 4, 8)  # model_parallel values on 8 devices
BUDGET = 4 * 32 * 3 * 4  # bytes: 4 rows of the 13-row cache, so it is kept in row shards
ENV = env_with_devices(8)


def _data(tok):
  """13 sequences: batches of 4 rows leave a padded last batch."""
  texts = [f"{t} {i}" for i in range(4) for t in TEXTS][:13]
  return hf.tokenizer.encode_domains(tok, texts, np.arange(13) % 2, ["a", "b"], 384, 32)


_CHILD = r"""
import json, os, sys

import jax
import numpy as np

import robust_gate.hf as hf
from robust_gate import checkpoint_job, experts, parallel
from robust_gate.checks import InputError
from robust_gate.hf import sharding
sys.path.insert(0, "tests")
from test_hf_sharding import BUDGET, PATHS, SPLITS, _data

out_dir = sys.argv[1]
out = {"device_count": jax.device_count(), "bytes": {}, "errors": {}}
whole = hf.load_models(PATHS)
d = _data(whole["gpt2"].tokenizer)
params = lambda loaded: [m.params for m in loaded.values()]
out["total_bytes"] = sum(a.nbytes for a in jax.tree.leaves(params(whole)))
out["bytes"]["default_device"] = sharding.device_bytes(params(whole))
out["bytes"]["replicated"] = sharding.device_bytes(parallel.replicate(params(whole)))
for mp in SPLITS:
  mesh = sharding.mesh(mp)
  loaded = hf.load_models(PATHS, place=sharding.placer(mesh))
  out["bytes"][str(mp)] = sharding.device_bytes(params(loaded))
  np.save(os.path.join(out_dir, f"cache_{mp}.npy"), sharding.score(loaded, d, mesh, batch_size=4))
  if mp == 4:
    out["specs"] = {
      n: jax.tree.map(lambda a: list(a.sharding.spec), m.params) for n, m in loaded.items()
    }
    # The job's cache files: written once, kept when valid (each written twice here),
    # rebuilt when damaged; in row shards over the budget; read as the job reads them.
    group, lines = hf.expert_group(loaded), []
    whole, rows = os.path.join(out_dir, "whole"), os.path.join(out_dir, "rows")
    for stem, budget in ((whole, None), (rows, BUDGET)) * 2:
      checkpoint_job.write_sharded_cache(stem, loaded, group, d, mesh, budget, lines.append)
    with open(whole + ".npz", "r+b") as f:
      f.seek(100)
      f.write(b"damaged")
    checkpoint_job.write_sharded_cache(whole, loaded, group, d, mesh, None, lines.append)
    out["lines"] = lines
    read = experts.stored_scores(rows, [group], d, budget_bytes=BUDGET, log=lines.append)
    out["rows_type"] = type(read).__name__
    np.save(os.path.join(out_dir, "rows.npy"), np.asarray(read))
for mp in (3, 0, 16):
  try:
    sharding.mesh(mp)
  except InputError as e:
    out["errors"][str(mp)] = str(e)
print(json.dumps(out))
"""


def _run_child(script: str, out_dir) -> tuple:
  """(out_dir, the JSON the child printed last): `script` run on 8 devices."""
  run = subprocess.run(
    [sys.executable, "-c", script, str(out_dir)],
    capture_output=True,
    text=True,
    timeout=600,
    env=ENV,
    cwd=ROOT,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return out_dir, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  return _run_child(_CHILD, tmp_path_factory.mktemp("eight"))


@pytest.fixture(scope="module")
def one_device():
  """The unsplit cache on this process's one device: experts.build_cache."""
  loaded = hf.load_models(PATHS)
  d = _data(loaded["gpt2"].tokenizer)
  return d, experts.build_cache([hf.expert_group(loaded)], d)


# The distillation runs: a teacher of both families (GPT-2's head tied to its
# embedding, the Llama's not), the student the Llama (λ̄'s largest domain), a few steps.
TEACHER = ("gpt2", "llama_untied")
DISTILL_SPLITS = (1, 2, 4)
DISTILL_STEPS, DISTILL_LR = 3, 3e-4

_DISTILL_CHILD = r"""
import json, os, sys, types

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from robust_gate import checkpoint_job, closures, models, train
from robust_gate.hf import sharding
from robust_gate.records import Gate
sys.path.insert(0, "tests")
from test_hf_sharding import DISTILL_LR, DISTILL_SPLITS, DISTILL_STEPS, PATHS, TEACHER
from test_hf_sharding import _data, _example

out_dir = sys.argv[1]
c = _example(experts=ConfigDict({n: PATHS[n] for n in TEACHER}))
c.distill.steps, c.distill.lr, c.distill.per_domain = DISTILL_STEPS, DISTILL_LR, 8
gate_cfg = models.GateConfig(num_experts=len(TEACHER), vocab_size=384, max_len=32)
gate = models.init_gate(gate_cfg, jax.random.PRNGKey(1))
lam_K = jnp.array([0.3, 0.7])
_, gate_state = train.make_game(
  lambda p, b, k: jnp.zeros(2), gate, num_domains=2, lr=0.0, dual_lr=0.0, seed=0, lam_K=lam_K
)
robust = Gate(gate_cfg, gate_state, None)
caches = types.SimpleNamespace(experts=types.SimpleNamespace(digest="test"))
out = {"device_count": jax.device_count(), "losses": {}, "bytes": {}, "student_whole": {}}
for mp in DISTILL_SPLITS:
  c.model_parallel = mp
  loaded = checkpoint_job.load_experts(c)  # split over the model axis as read
  d = _data(next(iter(loaded.values())).tokenizer)

  def run(game):
    # The arrays the compiled step is passed: what closures.hoist hands primal_dual.run.
    _, consts = closures.hoist(game.step, game.state, None)
    out["bytes"][mp] = sharding.device_bytes(consts)
    state, history = train.fit(game.step, game.state, game.steps, name="s", log=lambda s: None)
    out["losses"][mp] = history["losses"].tolist()
    return state

  mesh = checkpoint_job.model_mesh(c)
  student, init_from = checkpoint_job.distill_student(
    c, types.SimpleNamespace(train=d), loaded, caches, robust, run, mesh
  )
  out["init_from"] = init_from
  leaves = jax.tree.leaves(student.params)
  out["student_whole"][mp] = all(a.sharding.is_fully_replicated for a in leaves)
  np.savez(os.path.join(out_dir, f"student_{mp}.npz"), *map(np.asarray, leaves))
  if mp == 1:
    teacher = [m.params for m in loaded.values()]
    out["teacher_bytes"] = sum(a.nbytes for a in jax.tree.leaves(teacher))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  """checkpoint_job.distill_student on 8 devices, the teacher split 1, 2 and 4 ways."""
  return _run_child(_DISTILL_CHILD, tmp_path_factory.mktemp("distilled"))


def test_the_rule_splits_matrices_along_their_largest_divisible_axis():
  assert sharding.param_spec((384, 64), 4, stacked=False) == P("model", None)  # vocabulary
  assert sharding.param_spec((2, 64, 192), 4, stacked=True) == P(None, None, "model")
  assert sharding.param_spec((2, 64, 64), 4, stacked=True) == P(None, "model", None)  # a tie
  assert sharding.param_spec((2, 64, 96), 64, stacked=True) == P(None, "model", None)
  assert sharding.param_spec((2, 64), 4, stacked=True) == P()  # a stacked vector
  assert sharding.param_spec((64,), 4, stacked=False) == P()
  assert sharding.param_spec((30, 6), 4, stacked=False) == P()  # no axis divides
  assert sharding.param_spec((384, 64), 1, stacked=False) == P()


def test_split_scoring_equals_one_device_for_gpt2_and_llama_in_one_group(eight, one_device):
  out_dir, out = eight
  d, cache_NxTxM = one_device
  assert out["device_count"] == 8 and cache_NxTxM.shape == (13, 32, 3)
  for mp in SPLITS:
    split = np.load(out_dir / f"cache_{mp}.npy")
    assert split.shape == cache_NxTxM.shape and split.dtype == np.float32
    np.testing.assert_allclose(split, cache_NxTxM, rtol=1e-5, atol=1e-5, err_msg=f"{mp=}")
    assert np.all(split[~d.mask_NxT] == 0)


def test_each_device_holds_about_one_share_of_the_parameters(eight):
  _, out = eight
  total, held = out["total_bytes"], out["bytes"]
  assert held["default_device"] == {"0": total}  # hf.load: whole on one device
  assert set(held["replicated"].values()) == {total}  # data parallel: whole on each
  vectors = 0.02 * total  # norms and biases stay whole: under 2% of these models
  for mp in SPLITS:
    per_device = set(held[str(mp)].values())
    assert len(held[str(mp)]) == 8 and len(per_device) == 1, held[str(mp)]
    assert total / mp <= per_device.pop() <= total / mp + vectors, (mp, held[str(mp)])


def test_the_fixtures_are_split_as_the_rule_says(eight):
  specs = eight[1]["specs"]
  gpt2, llama = specs["gpt2"], specs["llama_untied"]
  assert gpt2["wte"] == ["model", None] and gpt2["ln_f_scale"] == []
  assert gpt2["layers"]["qkv_w"] == [None, None, "model"]  # [L, D, 3D]
  assert gpt2["layers"]["proj_w"] == [None, "model", None]  # [L, 4D, D]
  assert gpt2["layers"]["ln_1_bias"] == []
  assert llama["lm_head"] == ["model", None] and llama["norm"] == []
  assert llama["layers"]["up"] == [None, None, "model"]  # [L, D, F]
  assert llama["layers"]["down"] == [None, "model", None]  # [L, F, D]


def test_the_job_caches_are_kept_rebuilt_and_sharded_like_the_main_path(eight, one_device):
  out_dir, out = eight
  _, cache_NxTxM = one_device
  damaged = [line for line in out["lines"] if "damaged" in line]
  assert len(damaged) == 1 and "whole.npz" in damaged[0] and "rebuilding" in damaged[0]
  assert not [line for line in out["lines"] if line not in damaged]  # nothing rescored
  for read in (np.load(out_dir / "whole.npz")["cache"], np.load(out_dir / "rows.npy")):
    np.testing.assert_allclose(read, cache_NxTxM, rtol=1e-5, atol=1e-5)
  assert out["rows_type"] == "ShardedArray"


def test_a_model_axis_that_does_not_divide_the_devices_is_an_input_error(eight):
  errors = eight[1]["errors"]
  assert errors == {
    str(mp): f"model_parallel={mp} must be a positive divisor of the 8 devices."
    for mp in (3, 0, 16)
  }
  with pytest.raises(InputError, match=r"config\.model_parallel=2 must be"):
    checkpoint_job.model_mesh(_example(model_parallel=2))  # one device here


def _example(**overrides):
  c = config_files.load(os.path.join(ROOT, "launch/configs/checkpoints_example.py"))
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_the_launcher_with_model_parallel_writes_the_one_device_caches(tmp_path):
  """launch/checkpoints.py --config.model_parallel=4 on 8 devices, end to end."""
  workdir = str(tmp_path / "job")
  flags = "gate.steps=10 checkpoint_every=10 distill.steps=2 distill.per_domain=8"
  run = subprocess.run(
    [sys.executable, "launch/checkpoints.py", f"--workdir={workdir}", "--config.model_parallel=4"]
    + [f"--config.{f}" for f in flags.split()],
    capture_output=True,
    text=True,
    timeout=600,
    env=ENV,
    cwd=ROOT,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "split over the mesh {'data': 2, 'model': 4}" in run.stdout
  results = json.loads(pathlib.Path(workdir, "results.json").read_text())
  assert all(np.isfinite(v) for v in results["worst_case"].values())
  c = _example()
  loaded = checkpoint_job.load_experts(c)
  tok = next(iter(loaded.values())).tokenizer
  splits = checkpoint_data.load_splits(checkpoint_job.text_data(c), list(loaded), tok, 384)
  group = hf.expert_group(loaded)
  for split in ("validation", "test"):
    written = np.load(os.path.join(workdir, f"cache_{split}.npz"))
    assert str(written["fingerprint"]) == experts.cache_fingerprint(getattr(splits, split), [group])
    one = experts.build_cache([group], getattr(splits, split))
    np.testing.assert_allclose(written["cache"], one, rtol=1e-5, atol=1e-5, err_msg=split)


def test_distilling_from_a_split_teacher_equals_the_whole_one(distilled):
  """The student's steps from a teacher split 2 and 4 ways are the unsplit teacher's:
  every step's per-domain KL within 1e-5; the student's parameters too, but for a few.
  Adam moves each parameter by about its learning rate per step whatever the size of
  its gradient, so where a gradient is float32 rounding away from 0 the runs may step
  opposite ways: those few differ by at most 2·lr·steps."""
  out_dir, out = distilled
  assert out["device_count"] == 8 and out["init_from"] == 1  # the student: the Llama
  one = np.load(out_dir / "student_1.npz")
  assert len(out["losses"]["1"]) == DISTILL_STEPS and out["student_whole"]["1"]
  for mp in DISTILL_SPLITS[1:]:
    np.testing.assert_allclose(
      out["losses"][str(mp)], out["losses"]["1"], rtol=1e-5, atol=1e-6, err_msg=f"{mp=}"
    )
    assert out["student_whole"][str(mp)]  # returned whole on every device
    split = np.load(out_dir / f"student_{mp}.npz")
    assert list(split) == list(one)
    a = np.concatenate([one[k].ravel() for k in one])
    b = np.concatenate([split[k].ravel() for k in one])
    assert np.mean(np.isclose(b, a, rtol=1e-5, atol=1e-5)) > 0.9999, mp
    assert np.max(np.abs(b - a)) <= 2 * DISTILL_LR * DISTILL_STEPS, mp


def test_each_device_is_passed_about_one_share_of_the_teacher(distilled):
  """What the compiled distillation step is passed per device: the teacher's share,
  1/model_parallel (and the norms' and biases' vectors whole), beside what every
  device holds whole (the tokens, the gate). A teacher gathered to every device
  would put all of its bytes on each."""
  _, out = distilled
  teacher, held = out["teacher_bytes"], out["bytes"]
  assert len(held["1"]) == 8 and len(set(held["1"].values())) == 1
  others = held["1"]["0"] - teacher  # unsplit: the teacher whole on every device
  assert 0 < others < 0.1 * teacher
  vectors = 0.02 * teacher
  for mp in DISTILL_SPLITS[1:]:
    assert len(held[str(mp)]) == 8, held[str(mp)]
    for per_device in held[str(mp)].values():
      assert teacher / mp <= per_device - others <= teacher / mp + vectors, (mp, held[str(mp)])
