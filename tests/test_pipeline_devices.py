"""End-to-end: the tiny main job data-parallel on 8 simulated CPU devices in one process
= the 1-device run (tests/test_pipeline.py's finished job)."""

import subprocess

from devices import env_with_devices
from test_pipeline import ENV, _assert_same_results, _command, _results


def _one_device(request):
  """The finished tiny main job's results (conftest.py), asked for only once this file's
  own run is done: at the start of a 2-worker run another file's worker is running it."""
  return _results(request.getfixturevalue("finished_tiny_job")[0])


def test_eight_devices_match_one(request, tmp_path):
  """Every phase data-parallel on 8 simulated CPU devices = the 1-device run."""
  env = env_with_devices(8, ENV)
  out = subprocess.run(_command(tmp_path), capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_experts: 8 cpu device(s)" in out.stdout
  _assert_same_results(_one_device(request), _results(tmp_path))
