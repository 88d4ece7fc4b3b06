"""End-to-end: the tiny main job data-parallel on 8 simulated CPU devices in one process,
over its device budget so that every split and cache streams from the host, = the
1-device run held in memory (tests/test_pipeline.py's finished job). That streaming is
bitwise on one device, phase by phase, is tests/test_streaming.py's."""

import subprocess

from devices import env_with_devices
from test_pipeline import ENV, _assert_same_results, _command, _results


def _one_device(request):
  """The finished tiny main job's results (conftest.py), asked for only once this file's
  own run is done: at the start of a 2-worker run another file's worker is running it."""
  return _results(request.getfixturevalue("finished_tiny_job")[0])


def test_eight_devices_streaming_match_one_in_memory(request, tmp_path):
  """Every phase data-parallel on 8 simulated CPU devices, with a budget below every
  split and cache (the experts' and baselines' tokens and the gates' caches stream from
  the host; the caches are written in shards on disk) = the 1-device run."""
  env = env_with_devices(8, ENV)
  command = _command(tmp_path, "main", "--config.device_budget_bytes=1000")
  out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_experts: 8 cpu device(s)" in out.stdout
  assert "stream from the host" in out.stdout
  assert (tmp_path / "cache_test").is_dir() and not (tmp_path / "cache_test.npz").exists()
  _assert_same_results(_one_device(request), _results(tmp_path))
