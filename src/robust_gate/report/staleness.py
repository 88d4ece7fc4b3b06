"""Whether a result still describes the code: every provenance it carries (its own and
its inputs', robust_gate.provenance.INPUTS_KEY) against the repository's history.

The code a result describes is the files its command ran (`code_files`: the launcher, the
robust_gate modules it imports, the configs), so a commit to a module the command never
imports (a new experiment, the report) leaves it current.

A result is current only if all of them are; a stale one names the provenance furthest
behind. Where git cannot answer, the result is stale ("cannot tell"), never current.
"""

import ast
import dataclasses
import itertools
import os
import re
import sys
from typing import Any

from robust_gate.provenance import CODE_PATHS, git

# A stale result lists at most this many of the commits that changed its code since,
# each subject cut to SUBJECT_CHARS (this repository's subjects run to paragraphs).
MAX_COMMITS_LISTED = 5
SUBJECT_CHARS = 72
# How far behind a provenance that cannot be dated is: behind any count of commits.
_UNDATED = sys.maxsize


def short(commit: str) -> str:
  # A fixed length, not `git rev-parse --short`, whose length grows with the repository.
  return commit[:7]


def _subject(s: str) -> str:
  return s if len(s) <= SUBJECT_CHARS else s[: SUBJECT_CHARS - 1].rstrip() + "…"


def code_files(command: Any, repo: str) -> tuple[str, ...] | None:
  """The repository's files that the command `command` ran (repo-relative): its launcher
  `launch/<script>`, its config (`--config=`, else the launcher's default, and the
  configs a config loads by file name; every config where one cannot be told; none for a
  launcher that names no config, like the benchmark's), and the
  robust_gate modules the launcher and
  those configs import, directly or through each other, read from the checkout, with the
  module a launcher imports by a flag's name (`_SELECTS`: launch/experiment.py's
  `--experiment=<name>` runs `robust_gate.experiments.<name>`; None where the command
  names none, or one the checkout no longer has). None
  where the command names no launcher of the checkout: then all of CODE_PATHS counts.

  A commit that changes none of these files leaves the result describing the code; one
  that changes which modules are imported changes an importing file, which is here."""
  words = str(command).split() if isinstance(command, str) else []
  script = words[0] if words else ""
  launcher = os.path.join("launch", os.path.basename(script))
  if not script.endswith(".py") or not os.path.isfile(os.path.join(repo, launcher)):
    return None
  named = [w.partition("=")[2] for w in words if w.startswith("--config=")]
  if not named:  # the launcher's default config, named in it by file name, if any
    named = [os.path.join(_CONFIGS, n) for n in _py_names(os.path.join(repo, launcher))]
  configs = _configs(named, repo) if named else []
  reads_configs = bool(named)
  found, todo = {launcher, *configs}, [launcher, *configs]
  flag, package = _SELECTS.get(launcher, ("", ""))
  if flag:  # the module it imports by name: unknown (None) where the name has no file
    name = None  # the last one given, as absl takes it
    for word, after in itertools.pairwise([*words, ""]):
      if word.startswith(f"--{flag}="):
        name = word.partition("=")[2]
      elif word == f"--{flag}":
        name = after
    selected = _module_file(f"{package}.{name}", repo) if name else None
    if selected is None:
      return None
    todo.append(selected)
    found.add(selected)
  while todo:
    path = todo.pop()
    for module in _imported_modules(os.path.join(repo, path)):
      for module_path in _module_files(module, repo):
        if module_path not in found:
          found.add(module_path)
          todo.append(module_path)
  every_config = (_CONFIGS,) if reads_configs and not configs else ()
  return (*sorted(found), *every_config)


_CONFIGS = os.path.join("launch", "configs")
# Launchers that import a module named by a flag: {launcher: (flag, package)}; the
# module `<package>.<the flag's value>` counts as imported.
_SELECTS = {os.path.join("launch", "experiment.py"): ("experiment", "robust_gate.experiments")}


def _configs(named: list[str], repo: str) -> list[str]:
  """The config files `named` (paths as given to --config) and those they load by file
  name (`"<name>.py"` literals naming a file of launch/configs), repo-relative; [] where
  none is named or one lies outside launch/configs (then every config counts)."""
  out: list[str] = []
  todo = list(named)
  while todo:
    given = todo.pop()
    full = given if os.path.isabs(given) else os.path.join(repo, given)
    rel = os.path.relpath(os.path.realpath(full), os.path.realpath(repo))
    if os.path.dirname(rel) != _CONFIGS or not os.path.isfile(full):
      return []
    if rel in out:
      continue
    out.append(rel)
    loaded = [n for n in _py_names(full) if n != os.path.basename(rel)]
    todo += [os.path.join(_CONFIGS, n) for n in loaded]
  return out


def _py_names(path: str) -> list[str]:
  """The file names of a file's `"<path>.py"` string literals: the configs it names."""
  with open(path, encoding="utf-8") as f:
    return [os.path.basename(n) for n in re.findall(r"[\"']([\w./-]+\.py)[\"']", f.read())]


def _code_differs(commit: str, paths: tuple[str, ...], repo: str) -> bool:
  """Whether a file under `paths` differs between `commit` and HEAD: a Python file in
  more than comments, docstrings and layout (syntax trees without docstrings compared),
  another file in its bytes; a file present on one side only, or a Python file that
  does not parse, differs."""
  listed = lambda rev: git(repo, "ls-tree", "-r", "--name-only", rev, "--", *paths)
  before, after = listed(commit), listed("HEAD")
  if before is None or after is None:
    return True
  for name in sorted(set(before.splitlines()) | set(after.splitlines())):
    if not name.endswith(".py"):  # another file: its bytes
      if git(repo, "rev-parse", f"{commit}:{name}") != git(repo, "rev-parse", f"HEAD:{name}"):
        return True
      continue
    old, new = git(repo, "show", f"{commit}:{name}"), git(repo, "show", f"HEAD:{name}")
    if old is None or new is None or _syntax(old) is None or _syntax(old) != _syntax(new):
      return True
  return False


def _syntax(source: str) -> str | None:
  """The syntax tree of Python `source` without docstrings, as text; None if it does not
  parse."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return None
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (
      isinstance(body, list)
      and body
      and isinstance(body[0], ast.Expr)
      and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)
    ):
      node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
  return ast.dump(tree)


def _imported_modules(path: str) -> set[str]:
  """The robust_gate modules a Python file imports (`import robust_gate.x`, `from
  robust_gate import x`, `from robust_gate.x import y`), as dotted names."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return {n for n in names if n == "robust_gate" or n.startswith("robust_gate.")}


def _module_files(module: str, repo: str) -> list[str]:
  """The files importing `module` runs: each package's __init__.py on its path, and the
  module's own file where it exists (a name imported from a module is no file)."""
  parts, out = module.split("."), []
  for i in range(1, len(parts) + 1):
    stem = os.path.join("src", *parts[:i])
    for path in (os.path.join(stem, "__init__.py"), stem + ".py"):
      if os.path.isfile(os.path.join(repo, path)):
        out.append(path)
  return out


def _module_file(module: str, repo: str) -> str | None:
  """The file of a module named by a dotted `module` (a module, not a package), if the
  checkout has it and the name is one."""
  parts = module.split(".")
  if not all(p.isidentifier() for p in parts):
    return None
  path = os.path.join("src", *parts) + ".py"
  return path if os.path.isfile(os.path.join(repo, path)) else None


def code_commits_since(
  commit: str, repo: str, paths: tuple[str, ...] = CODE_PATHS
) -> list[tuple[str, str]] | None:
  """(hash, subject) of every commit after `commit` up to HEAD touching `paths` (by
  default all of CODE_PATHS), newest first; None where git log fails."""
  out = git(repo, "log", "--format=%H %s", f"{commit}..HEAD", "--", *paths)
  if out is None:
    return None
  return [(h, s) for h, _, s in (line.partition(" ") for line in out.splitlines())]


def _behind(prov: Any, repo: str) -> tuple[int, str] | None:
  """(how far behind, why) for a provenance that no longer describes the code; None if
  it does. How far: the number of code commits since, _UNDATED where it cannot be told."""
  if not isinstance(prov, dict):
    return _UNDATED, "no provenance"
  commit = prov.get("commit")
  if not isinstance(commit, str) or not commit or commit == "unknown":
    return _UNDATED, "commit unknown"
  if git(repo, "rev-parse", "HEAD") is None:
    return (
      _UNDATED,
      f"cannot tell whether the code changed since {short(commit)}: git fails in {repo}",
    )
  full = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
  if not full or git(repo, "merge-base", "--is-ancestor", full, "HEAD") is None:
    return _UNDATED, f"commit {short(commit)} is not in this repository's history"
  paths = code_files(prov.get("command"), repo) or CODE_PATHS
  since = code_commits_since(full, repo, paths)
  if since is None:
    return _UNDATED, f"cannot tell whether the code changed since {short(full)}: git log fails"
  if prov.get("dirty"):
    dirty = f"made with uncommitted changes to the code on top of {short(full)} (dirty)"
    return len(since), dirty
  if not since or not _code_differs(full, paths, repo):
    return None
  listed = "; ".join(f"{short(h)} {_subject(s)}" for h, s in since[:MAX_COMMITS_LISTED])
  more = len(since) - MAX_COMMITS_LISTED
  what = ", ".join(CODE_PATHS) if paths == CODE_PATHS else "the files it ran"
  return len(since), (
    f"its code differs from {short(full)}'s; {len(since)} commit{'s' if len(since) > 1 else ''} "
    f"changed {what} since: {listed}" + (f"; and {more} more" if more > 0 else "")
  )


def stale_reason(prov: dict | None, repo: str) -> str | None:
  """Why a result with provenance `prov` no longer describes the code in `repo`; None if it does.

  Stale: no provenance, an unknown commit or one outside the repository's history,
  uncommitted changes to the code when it ran (dirty), a later commit to
  provenance.CODE_PATHS (the reason then names up to MAX_COMMITS_LISTED of them), or a
  repository where git fails (it cannot tell). Unknown dirtiness (None) is not stale:
  `check` warns of it.
  """
  found = _behind(prov, repo)
  return None if found is None else found[1]


@dataclasses.dataclass(frozen=True)
class Verdict:
  stale: str | None  # why the result no longer describes the code; None: current
  warning: str | None  # what cannot be checked (unknown dirtiness); None: nothing


def _carried(prov: Any, inputs: Any, needs_inputs: bool) -> list[tuple[str, Any]]:
  """(label, provenance) of every provenance a result carries: its own (label ""), then
  each run of each input; None for an input whose origin is unknown."""
  carried: list[tuple[str, Any]] = [("", prov)]
  if not isinstance(inputs, dict):
    return carried + ([("its inputs", None)] if needs_inputs else [])
  for name, runs in inputs.items():
    runs = runs if isinstance(runs, list) and runs else [None]
    carried += [(f"input `{name}`", run) for run in runs]
  return carried


def _reason(label: str, why: str) -> str:
  if label == "its inputs":  # a JSON written before results carried INPUTS_KEY
    return "the provenance of its inputs (the models it was computed from) is unknown"
  return f"{label}: {why}" if label else why


def check(prov: Any, inputs: Any, repo: str, *, needs_inputs: bool) -> Verdict:
  """Whether a result with provenance `prov` and input provenance `inputs` ({input:
  [provenance, ...] or None}) describes the code in `repo`.

  With `needs_inputs` (a result computed from trained models), missing `inputs` is
  stale: the models' code is unknown. The stale reason is that of the provenance
  furthest behind (the result's own first among equals), with how many others are
  stale; the warning names those of unknown dirtiness.
  """
  carried = _carried(prov, inputs, needs_inputs)
  memo: dict[str, tuple[int, str] | None] = {}  # models trained together share a commit

  def behind(p: Any) -> tuple[int, str] | None:
    key = repr((p.get("commit"), p.get("dirty")) if isinstance(p, dict) else p)
    if key not in memo:
      memo[key] = _behind(p, repo)
    return memo[key]

  verdicts = [(label, p, behind(p)) for label, p in carried]
  stale = [(found, label) for label, _, found in verdicts if found is not None]
  unknown_dirt = [
    label or "this result"
    for label, p, found in verdicts
    if found is None and p.get("dirty") is None
  ]
  warning = None
  if unknown_dirt:
    names = ", ".join(dict.fromkeys(unknown_dirt))
    warning = f"whether the code had uncommitted changes is unknown (a copied tree) for {names}"
  if not stale:
    return Verdict(None, warning)
  (_, why), label = max(stale, key=lambda s: s[0][0])  # the first among equals
  reason = _reason(label, why)
  if len(stale) > 1:
    reason += f" ({len(stale) - 1} more of its {len(carried)} provenances stale)"
  return Verdict(reason, warning)
