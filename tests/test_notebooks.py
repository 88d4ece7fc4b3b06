"""Every notebook runs top to bottom (on CPU, in minutes) and is committed stripped."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_executes(path, monkeypatch):
  # As a user runs them: from notebooks/, with no finished workdir given (02 then
  # runs its smaller job in a temporary directory).
  monkeypatch.delenv("ROBUST_GATE_WORKDIR", raising=False)
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
  ).execute()
  # NotebookClient raises at the first failing cell; past it, every code cell ran.
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.get("execution_count") is not None for c in code)


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
