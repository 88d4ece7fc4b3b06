"""Whether a result still describes the code: its provenance against the repository's history."""

import subprocess

from robust_gate.provenance import CODE_PATHS

# A stale result lists at most this many of the commits that changed its code since,
# each subject cut to SUBJECT_CHARS (this repository's subjects run to paragraphs).
MAX_COMMITS_LISTED = 5
SUBJECT_CHARS = 72


def git(repo: str, *args: str) -> str | None:
  """stdout of `git -C repo args`, stripped; None where git fails (no repo, bad commit)."""
  try:
    out = subprocess.run(
      ["git", "-C", repo, *args], capture_output=True, text=True, timeout=30, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def short(commit: str) -> str:
  # A fixed length, not `git rev-parse --short`, whose length grows with the repository.
  return commit[:7]


def head(repo: str) -> tuple[str, bool]:
  """(HEAD, dirty under CODE_PATHS) of `repo`; ("unknown", False) outside a git checkout."""
  commit = git(repo, "rev-parse", "HEAD")
  if not commit:
    return "unknown", False
  status = git(repo, "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
  return commit, bool(status)


def _subject(s: str) -> str:
  return s if len(s) <= SUBJECT_CHARS else s[: SUBJECT_CHARS - 1].rstrip() + "…"


def code_commits_since(commit: str, repo: str) -> list[tuple[str, str]]:
  """(hash, subject) of every commit after `commit` up to HEAD touching CODE_PATHS, newest first."""
  out = git(repo, "log", "--format=%H %s", f"{commit}..HEAD", "--", *CODE_PATHS)
  if not out:
    return []
  return [(h, s) for h, _, s in (line.partition(" ") for line in out.splitlines())]


def stale_reason(prov: dict | None, repo: str) -> str | None:
  """Why a result with provenance `prov` no longer describes the code in `repo`; None if it does.

  Stale: no provenance, an unknown commit or one outside the repository's history,
  uncommitted changes to the code when it ran (dirty), or a later commit to
  provenance.CODE_PATHS (the reason then names up to MAX_COMMITS_LISTED of them).
  """
  if not isinstance(prov, dict):
    return "no provenance"
  commit = prov.get("commit")
  if not isinstance(commit, str) or not commit or commit == "unknown":
    return "commit unknown"
  full = git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
  if not full or git(repo, "merge-base", "--is-ancestor", full, "HEAD") is None:
    return f"commit {short(commit)} is not in this repository's history"
  if prov.get("dirty"):
    return f"made with uncommitted changes to the code on top of {short(full)} (dirty)"
  since = code_commits_since(full, repo)
  if not since:
    return None
  listed = "; ".join(f"{short(h)} {_subject(s)}" for h, s in since[:MAX_COMMITS_LISTED])
  more = len(since) - MAX_COMMITS_LISTED
  return (
    f"{len(since)} commit{'s' if len(since) > 1 else ''} changed "
    f"{', '.join(CODE_PATHS)} since {short(full)}: {listed}"
    + (f"; and {more} more" if more > 0 else "")
  )
