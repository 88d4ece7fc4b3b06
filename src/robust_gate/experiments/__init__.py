"""The paper's claims as experiments on a finished main job (`launch/experiment.py`).

Each experiment is `EXPERIMENTS[name](config, workdir, log) -> dict`: it reads the
models and caches that `launch/main.py` left in `workdir` (except `jsd`, which runs
its own main jobs under `workdir`), prints a table, and writes
`<workdir>/experiments/<name>.json` (with "experiment", "provenance" and the provenance
of the models and results.json it read) and `<name>.png` (`reporting`). Every loss is
that of a normalized model: gates are the causal gates of docs/math.md §2.1 (in G_1 by
construction), except `sequence_gate`'s sequence-level gate, divided by its normalizer
estimated on a fresh sample of the experts (§2.2).

What an experiment trains it trains once per seed of `common.seeds`
(`config.experiment_seeds`, 3 by default) and reports as mean ± sd over them with the
per-seed values; its JSON's "seeds" and "seeds_note" say which seeds and what they vary.
Whatever an experiment chooses (an order, a variant) it chooses on validation; test
numbers are outcomes, never used to choose.

  mixtures     the loss of every method over a grid of test mixtures on the simplex
  conflict     per-domain gradient cosines over training: monolithic model vs gate
  jsd          synthetic domains of controlled Jensen-Shannon divergence (exact)
  gate_size    robust gates of increasing width on increasing data: held-out vs train
  prior        box and KL-ball Λ against the simplex: worst case inside and outside Λ
  extend       a new domain's expert added to a fitted gate: warm start vs scratch
  prune        experts with little gate mass under λ̄ dropped: worst case and cost
  ema          the reported gate as an EMA of w, several decays, against the last iterate
  convergence  the duality gap over training: constant, decreasing and optimistic dual steps
  sequence_gate  a sequence-level gate (Z_w from expert samples) against the causal gate,
               and distilled into a causal gate
  student_size students of 1×, 2×, 4× an expert distilled from the robust gate on the data
               source validation picks (train, held-out, teacher samples): gap to the teacher
  student_seeds the main job's student against the single models of its size (monolithic,
               group DRO), each trained again per seed: is the student lower beyond noise?
"""

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Mapping

from robust_gate.checks import InputError

# The modules of this package that are no experiment: what the experiments share.
_HELPERS = ("common", "reporting")


class _Experiments(Mapping[str, Callable[..., dict]]):
  """Every module of this package but the helpers, by name; an experiment's module is
  imported when it is looked up. So running one experiment imports its own code (and
  what that imports), and adding an experiment changes no other's code
  (robust_gate.report.staleness follows `--experiment=` to the module)."""

  def _names(self) -> list[str]:
    """Experiment modules: plain modules named as identifiers, not private, no helper."""
    return sorted(
      m.name
      for m in pkgutil.iter_modules(__path__)
      if not m.ispkg
      and m.name.isidentifier()
      and not m.name.startswith("_")
      and m.name not in _HELPERS
    )

  def __contains__(self, name: object) -> bool:  # without importing the module
    return name in self._names()

  def __getitem__(self, name: str) -> Callable[..., dict]:
    if name not in self:
      raise KeyError(name)
    run = getattr(importlib.import_module(f"{__name__}.{name}"), "run", None)
    if not callable(run):  # a module of this package that breaks its contract: a bug
      raise TypeError(f"{__name__}.{name} is listed as an experiment but has no run().")
    return run

  def __iter__(self) -> Iterator[str]:
    return iter(self._names())

  def __len__(self) -> int:
    return len(self._names())


EXPERIMENTS: Mapping[str, Callable[..., dict]] = _Experiments()


def parse_settings(pairs: list[str], experiment: str) -> dict:
  """`launch/experiment.py --setting NAME=VALUE` pairs as keyword arguments of the
  experiment's run (VALUE a Python literal); InputError for a malformed pair, or for an
  experiment whose run takes no settings."""
  if pairs and not any(
    p.kind == p.VAR_KEYWORD for p in inspect.signature(EXPERIMENTS[experiment]).parameters.values()
  ):
    raise InputError(f"--setting: experiment {experiment} takes no settings.")
  out = {}
  for pair in pairs:
    name, eq, value = pair.partition("=")
    try:
      out[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      eq = ""
    if not eq or not name.strip():
      raise InputError(f"--setting={pair!r}: give NAME=VALUE with VALUE a Python literal.")
  return out
