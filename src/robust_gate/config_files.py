"""Load an ml_collections config file by path (launchers, derived configs, notebooks)."""

import hashlib
import importlib.util
import os


def load(path: str, *args):
  """Runs `get_config(*args)` of the config file at `path`.

  The file is imported under a name derived from its absolute path, so a config
  file never shadows (or is shadowed by) an installed package of the same name
  (`configs/wordfreq.py` against the `wordfreq` package).
  """
  path = os.path.abspath(path)
  name = "robust_gate_config_" + hashlib.sha1(path.encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None, path
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)
