"""Every notebook runs top to bottom (on CPU) and is committed stripped.

Notebook 02 explores a finished main job. It runs here on the finished tiny job every
file shares (conftest.py), as a user runs it with `ROBUST_GATE_WORKDIR` set; without
it, its first cell trains a smaller wordfreq job of its own, about two minutes of
compilation and training on the 2-core CPU that tests/test_pipeline*.py already cover
for the same `pipeline.run`. That branch runs here in-process with `pipeline.run`
replaced: its config must pass the launchers' checks and the rest of the cell must read
what `run` returns.
"""

import glob
import inspect
import json
import os
import shutil
import tempfile

import nbformat
import pytest
from absl import logging as absl_logging
from nbclient import NotebookClient
from test_pipeline import ENV

from robust_gate import config_files, pipeline, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
LANGUAGES = os.path.join(ROOT, "notebooks", "02_languages.ipynb")
# The launchers' persistent compilation cache (tests/test_pipeline.py's ENV), which holds
# the finished tiny job's programs: notebook 02's kernel, a process of its own like a
# launcher, restores and evaluates that job's models with them instead of compiling.
_CACHE = (
  "JAX_COMPILATION_CACHE_DIR",
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
  "JAX_COMPILATION_CACHE_MAX_SIZE",  # none: no lock, no scan of every entry (devices.py)
)


def _execute(path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  ).execute()
  # NotebookClient raises at the first failing cell; past it, every code cell ran.
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.get("execution_count") is not None for c in code)
  return code


def test_notebook_01_executes():
  _execute(os.path.join(ROOT, "notebooks", "01_finite_minimax.ipynb"))


def test_notebook_02_executes_on_a_finished_job(finished_tiny_job, tmp_path, monkeypatch):
  workdir = tmp_path / "job"  # a copy: the notebook's loads must not touch the shared one
  shutil.copytree(finished_tiny_job[0], workdir)
  monkeypatch.setenv("ROBUST_GATE_WORKDIR", str(workdir))
  for name in _CACHE:  # the kernel reads the tiny job's programs, as a launcher does
    monkeypatch.setenv(name, ENV[name])
  code = _execute(LANGUAGES)
  printed = "".join(o.get("text", "") for o in code[0].outputs if o.output_type == "stream")
  assert str(workdir) in printed and "robust_gate" in printed
  samples = "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream")
  assert "student" in samples and "robust_gate" in samples


def test_notebook_02_without_a_workdir_runs_its_own_smaller_job(
  finished_tiny_job, tmp_path, monkeypatch, capsys
):
  """The first cell's other branch, in this process with `pipeline.run` replaced by the
  launchers' config checks: its config is valid, a wordfreq job on three languages in a
  new temporary directory, and the cell reads the results `run` returns. (No test
  trains that job: the README's main command is the wordfreq job end to end.)"""
  calls = []
  real = inspect.signature(pipeline.run)

  def run(*args, **kwargs):
    config, workdir = real.bind(*args, **kwargs).args[:2]  # called as the real one takes
    preflight.check_config(config)
    calls.append((config, workdir))
    return json.loads((finished_tiny_job[0] / "results.json").read_text())

  monkeypatch.setattr(pipeline, "run", run)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the cell's mkdtemp goes here
  monkeypatch.delenv("ROBUST_GATE_WORKDIR", raising=False)
  monkeypatch.chdir(os.path.dirname(LANGUAGES))  # as the notebook runs: paths are relative
  # The cell quiets absl for its kernel; here that is this worker's, so it is put back.
  monkeypatch.setattr(absl_logging, "set_verbosity", lambda v: None)
  cell = next(c for c in nbformat.read(LANGUAGES, as_version=4).cells if c.cell_type == "code")
  exec(compile(cell.source, LANGUAGES, "exec"), {})  # pylint: disable=exec-used
  [(config, workdir)] = calls
  # Every field the cell sets is one the launcher's config has (a renamed field would
  # otherwise be a new key that nothing reads).
  default = config_files.load(os.path.join(ROOT, "launch", "configs", "wordfreq.py"))
  assert _fields(config.to_dict()) == _fields(default.to_dict())
  assert config.data.name == "wordfreq" and tuple(config.data.options.languages) == (
    "en",
    "fi",
    "pl",
  )
  assert os.path.dirname(workdir) == str(tmp_path) and not os.listdir(workdir)
  assert "robust_gate" in capsys.readouterr().out


def _fields(tree, prefix=""):
  out = set()
  for key, value in tree.items():
    out |= _fields(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
  return out


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_is_committed_stripped(path):
  # Committed without outputs or execution counts, so diffs show code changes only
  # (strip with nbformat: outputs = [], execution_count = None, per-run metadata gone).
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{path} has no code cells"
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"{path}: code cell {i} has outputs"
    assert cell.execution_count is None, f"{path}: code cell {i} has an execution count"
    assert "execution" not in cell.metadata, f"{path}: code cell {i} has execution timings"
  assert "language_info" not in nb.metadata, f"{path}: notebook metadata has language_info"


def test_there_are_notebooks():
  assert [os.path.basename(p) for p in NOTEBOOKS] == [
    "01_finite_minimax.ipynb",
    "02_languages.ipynb",
  ]
