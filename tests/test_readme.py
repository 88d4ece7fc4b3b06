"""The README's Python example runs as written (docs match the code)."""

import os
import pathlib
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run():
  text = pathlib.Path(ROOT, "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
  text = pathlib.Path(ROOT, "README.md").read_text()
  # The command is the first line after the comment lines that introduce it.
  command = re.search(r"# Install and run the test suite.*\n(?:#.*\n)*(.*)\n", text).group(1)
  assert command.startswith("python3 -m venv"), command
  assert command.strip() in pathlib.Path(ROOT, ".ci", "run").read_text().splitlines()
