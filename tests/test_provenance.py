"""robust_gate.provenance: what counts as dirty, the ROBUST_GATE_COMMIT override, and a
model's record of the runs that trained it."""

import dataclasses
import json
import os

import pytest
from test_report import _git  # a git command in a throwaway repo, with an author set

from robust_gate import layout, provenance
from robust_gate.checks import InputError


@pytest.fixture
def repo(tmp_path):
  """A git repo with one committed file under src/robust_gate/: (path, commit)."""
  r = tmp_path / "repo"
  (r / "src" / "robust_gate").mkdir(parents=True)
  (r / "src" / "robust_gate" / "a.py").write_text("x = 1\n")
  _git(r, "init", "-q")
  _git(r, "add", ".")
  _git(r, "commit", "-q", "-m", "first")
  return r, _git(r, "rev-parse", "HEAD")


@pytest.mark.parametrize(
  "path,text,dirty",
  [
    ("src/robust_gate/a.py", "x = 2\n", True),  # a tracked file changed
    ("src/robust_gate/new.py", "y = 1\n", True),  # a new module the package may import
    ("launch/configs/new.py", "z = 1\n", True),  # a new launcher or config
    ("src/robust_gate/notes.txt", "notes\n", False),  # not code
    ("tools/new.py", "w = 1\n", False),  # outside provenance.CODE_PATHS
  ],
)
def test_what_makes_a_checkout_dirty(repo, path, text, dirty):
  r, commit = repo
  assert provenance.repo_state(str(r)) == (commit, False)
  (r / path).parent.mkdir(parents=True, exist_ok=True)
  (r / path).write_text(text)
  assert provenance.repo_state(str(r)) == (commit, dirty)


def test_outside_a_checkout(tmp_path):
  assert provenance.repo_state(str(tmp_path)) == ("unknown", False)
  assert provenance.git(str(tmp_path), "rev-parse", "HEAD") is None  # failed, not ""


def test_a_stated_commit_has_unknown_dirtiness(monkeypatch):
  """A copied tree states its commit; whether it matched that commit is unknown."""
  monkeypatch.setenv("ROBUST_GATE_COMMIT", "abc1234" * 5)
  assert provenance.git_commit() == ("abc1234" * 5, None)
  p = provenance.collect({"seed": 3}).to_dict()
  assert (p["commit"], p["dirty"], p["config"]) == ("abc1234" * 5, None, {"seed": 3})


def test_training_runs_are_recorded_and_appended(tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  gate = workdir / "robust_gate"
  assert provenance.read_training(str(gate)) is None  # trained by unknown code
  monkeypatch.setenv("ROBUST_GATE_COMMIT", "1" * 40)
  provenance.record_training(str(gate))
  monkeypatch.setenv("ROBUST_GATE_COMMIT", "2" * 40)
  provenance.record_training(str(gate))  # resumed by newer code
  runs = provenance.read_training(str(gate))
  assert [r["commit"] for r in runs] == ["1" * 40, "2" * 40]
  assert set(runs[0]) == {f.name for f in dataclasses.fields(provenance.Provenance)}
  assert os.listdir(gate) == [provenance.TRAINING_FILE]  # written atomically: no temporary left
  models = provenance.models(str(workdir))
  assert list(models) == list(layout.MODEL_DIRS)
  assert models["robust_gate"] == runs
  assert all(models[m] is None for m in layout.MODEL_DIRS if m != "robust_gate")


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"runs": [1]})])
def test_a_damaged_training_record_is_an_input_error(tmp_path, text):
  (tmp_path / provenance.TRAINING_FILE).write_text(text)
  with pytest.raises(InputError, match=provenance.TRAINING_FILE):
    provenance.read_training(str(tmp_path))
