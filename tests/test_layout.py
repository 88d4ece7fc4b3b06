"""robust_gate.layout: the one table of the workdir's models agrees with the records the
phases return, and what is derived from it is what the job relies on."""

import dataclasses
import os

import pytest

from robust_gate import config_files, layout, records

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "configs", "tiny.py")


def test_the_table_names_every_model_the_records_hold():
  """The directories are the records' field names (what `Gates.items()` and
  `Monoliths.items()` name the models by), with the experts and the student."""
  fields = lambda record: [f.name for f in dataclasses.fields(record)]
  expected = ["experts", *fields(records.Gates), "student", *fields(records.Monoliths)]
  assert list(layout.MODEL_DIRS) == expected
  assert sorted(n for p in layout.PHASES for n in layout.trained_by(p)) == sorted(expected)


def test_every_model_trains_for_a_section_the_config_has_after_what_it_is_built_from():
  config = config_files.load(TINY)
  order = {name: i for i, name in enumerate(layout.MODEL_DIRS)}
  phase = {p: i for i, p in enumerate(layout.PHASES)}
  for m in layout.MODELS:
    assert isinstance(config[m.section].steps, int), m.name
    for source in m.built_from:  # trained first, by this phase or an earlier one
      assert order[source] < order[m.name], m.name
      assert phase[layout.model(source).phase] <= phase[m.phase], m.name
  assert layout.trained_by("evaluate") == ()


def test_what_is_built_from_a_model():
  assert layout.built_from_it("experts") == (
    "cache_validation.npz",
    "cache_validation",
    "cache_test.npz",
    "cache_test",
    "robust_gate",
    "erm_gate",
    "best_response",
    "student",
    "monolithic",
    "monolithic_dro",
    "monolithic_large",
  )
  assert layout.built_from_it("robust_gate") == ("best_response", "student")
  assert layout.built_from_it("monolithic") == ()
  with pytest.raises(ValueError, match="unknown phase 'distil'"):
    layout.trained_by("distil")
