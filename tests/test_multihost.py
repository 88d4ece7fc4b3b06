"""Multi-host: the main job over 2 processes (jax.distributed, gloo on CPU) equals
the 1-process run. Its own file so pytest-xdist runs it beside test_pipeline.py."""

import socket
import subprocess

from test_pipeline import ENV, _assert_same_results, _command, _main, _results


def test_two_processes_match_one(tmp_path):
  """2 processes × 4 CPU devices each = the 1-device run, every number; process 0
  alone writes the workdir and prints."""
  one = tmp_path / "one"
  out = _main(one)
  assert out.returncode == 0, out.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  two = tmp_path / "two"
  procs = [subprocess.Popen(
      _command(two, "main", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in (1, 0)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "train_experts: 8 cpu device(s) in 2 process(es)" in outs[1][0]
  assert "train_experts" not in outs[0][0]  # process 1 prints nothing
  _assert_same_results(_results(one), _results(two))
