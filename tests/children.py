"""Test bodies that train, run in one process of their own instead of the pytest worker.

A pytest worker compiles without the persistent compilation cache (conftest.py: the
workers' crashes), so a test body that trains in-process compiles programs that the
finished tiny job's launcher already compiled and cached. `run` calls functions of a
test module one after the other in one child with the launchers' environment (their
cache; tests/test_pipeline.py's ENV): one process start for all of them. Each body
keeps its assertions; a failure comes back as its traceback, for its own test.
"""

import json
import os
import subprocess
import sys

_CHILD = f"""
import importlib, json, sys, traceback
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
module = importlib.import_module(sys.argv[1])
done = {{}}
for name, args in json.loads(sys.argv[2]).items():
  try:
    getattr(module, name)(*args)
    done[name] = None
  except KeyboardInterrupt:
    raise
  except BaseException:  # pytest.fail, a failed pytest.raises, sys.exit: this body's failure
    done[name] = traceback.format_exc()
print(json.dumps(done))
"""


def run(module: str, calls: dict[str, list], env: dict) -> dict[str, str | None]:
  """{name: None, or the traceback of its failure} for each call `module.name(*args)` of
  `calls` (arguments in JSON), made in order in one child process with `env`."""
  child = subprocess.run(
    [sys.executable, "-c", _CHILD, module, json.dumps(calls)],
    capture_output=True,
    text=True,
    timeout=1100,
    env=env,
  )
  assert child.returncode == 0, child.stderr[-3000:]
  return json.loads(child.stdout.strip().splitlines()[-1])


def selected(request, names) -> list[str]:
  """The bodies among `names` (`_<name>`, the body of test `test_<name>`) whose tests in
  `request`'s module this session runs."""
  tests = {item.name for item in request.session.items if item.path == request.path}
  return [n for n in names if f"test{n}" in tests]


def run_on_job(request, names, job: str, tmp_path_factory, env: dict) -> dict[str, str | None]:
  """`run`'s record of the bodies among `names` whose tests this session runs, in one
  child of `request`'s module, each given `job` and a directory of its own."""
  calls = {n: [job, str(tmp_path_factory.mktemp("child"))] for n in selected(request, names)}
  return run(request.path.stem, calls, env)


def check(done: dict[str, str | None], name: str) -> None:
  """Fails with the child's traceback unless body `name` ran and passed."""
  assert name in done, f"{name} did not run"
  assert done[name] is None, done[name][-3000:]
