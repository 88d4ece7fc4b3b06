"""Whether a result still describes the code: every provenance it carries (its own and
its inputs', robust_gate.provenance.INPUTS_KEY) against the repository's history.

A result is current only if all of them are; a stale one names the provenance furthest
behind. Where git cannot answer, the result is stale ("cannot tell"), never current.
"""

import dataclasses
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


def code_commits_since(commit: str, repo: str) -> list[tuple[str, str]] | None:
  """(hash, subject) of every commit after `commit` up to HEAD touching CODE_PATHS, newest
  first; None where git log fails."""
  out = git(repo, "log", "--format=%H %s", f"{commit}..HEAD", "--", *CODE_PATHS)
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
  since = code_commits_since(full, repo)
  if since is None:
    return _UNDATED, f"cannot tell whether the code changed since {short(full)}: git log fails"
  if prov.get("dirty"):
    dirty = f"made with uncommitted changes to the code on top of {short(full)} (dirty)"
    return len(since), dirty
  if not since:
    return None
  listed = "; ".join(f"{short(h)} {_subject(s)}" for h, s in since[:MAX_COMMITS_LISTED])
  more = len(since) - MAX_COMMITS_LISTED
  return len(since), (
    f"{len(since)} commit{'s' if len(since) > 1 else ''} changed "
    f"{', '.join(CODE_PATHS)} since {short(full)}: {listed}"
    + (f"; and {more} more" if more > 0 else "")
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
