"""The generated results pages: staleness against git history, and an end-to-end render."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from robust_gate import provenance, report
from robust_gate.checks import InputError
from robust_gate.report import pages, staleness, tables

# A valid 1×1 PNG: the report copies figures byte for byte and never decodes them.
_PNG = bytes.fromhex(
  "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
  "0000000d4944415478da63f8cfc0f01f0005000201e5273ea80000000049454e44ae426082"
)


def _git(repo, *args) -> str:
  env = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
  }
  out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)
  return out.stdout.decode().strip()


def _commit(repo, path, text, subject) -> str:
  full = repo / path
  full.parent.mkdir(parents=True, exist_ok=True)
  full.write_text(text)
  _git(repo, "add", path)
  _git(repo, "commit", "-q", "-m", subject)
  return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
  """A git repo with two commits to src/robust_gate/: (path, first commit, second commit)."""
  r = tmp_path / "repo"
  r.mkdir()
  _git(r, "init", "-q")
  first = _commit(r, "src/robust_gate/a.py", "x = 1\n", "first")
  second = _commit(r, "src/robust_gate/a.py", "x = 2\n", "change the code")
  return r, first, second


def _prov(commit, dirty=False, device="1 × H100") -> dict:
  return {
    "commit": commit,
    "dirty": dirty,
    "date": "2025-01-02T03:04:05+00:00",
    "device": device,
    "platform": "gpu",
    "process_count": 1,
    "host": "test host, 2 cores",
    "jax_version": "0.0.0",
    "command": "main.py --workdir=/w --config=launch/configs/digits.py",
    "config": {"seed": 0},
  }


def test_stale_reason(repo):
  r, first, second = repo
  assert report.stale_reason(_prov(second), str(r)) is None
  reason = report.stale_reason(_prov(first), str(r))
  assert reason is not None and second[:7] in reason and "change the code" in reason
  assert report.stale_reason(_prov(second, dirty=True), str(r)) is not None
  assert report.stale_reason(None, str(r)) == "no provenance"
  assert report.stale_reason(_prov("unknown"), str(r)) is not None
  assert "not in this repository" in report.stale_reason(_prov("0" * 40), str(r))
  # A later commit outside provenance.CODE_PATHS leaves the result current.
  _commit(r, "docs/notes.md", "notes\n", "docs only")
  assert report.stale_reason(_prov(second), str(r)) is None
  # Unknown dirtiness (a copied tree that stated its commit) is a warning, not stale.
  assert report.stale_reason(_prov(second, dirty=None), str(r)) is None


def test_stale_when_git_cannot_tell(repo, tmp_path, monkeypatch):
  """A failing git is "cannot tell" (stale), never current."""
  r, _, second = repo
  not_a_repo = tmp_path / "copy"
  not_a_repo.mkdir()
  assert "cannot tell" in report.stale_reason(_prov(second), str(not_a_repo))
  real_git = staleness.git
  monkeypatch.setattr(
    staleness, "git", lambda repo, *args: None if args[0] == "log" else real_git(repo, *args)
  )
  reason = report.stale_reason(_prov(second), str(r))
  assert reason is not None and "cannot tell" in reason and "git log fails" in reason


def _inputs(**commits) -> dict:
  """An INPUTS_KEY entry: each model trained by runs at the given commits (None: unknown)."""
  return {
    name: None if c is None else [_prov(x) for x in (c if isinstance(c, list) else [c])]
    for name, c in commits.items()
  }


def test_check_every_provenance_a_result_carries(repo):
  """Current only if its own and every input's provenance are; the stale reason names
  the provenance furthest behind and counts the others."""
  r, first, second = repo
  repo_ = str(r)
  ok = report.check(_prov(second), _inputs(experts=second), repo_, needs_inputs=True)
  assert ok == report.Verdict(None, None)
  # A model trained by older code than the evaluation makes the result stale.
  v = report.check(_prov(second), _inputs(experts=second, student=first), repo_, needs_inputs=True)
  assert (
    v.stale.startswith("input `student`: its code differs")
    and "1 commit changed" in v.stale
    and "more" not in v.stale
  )
  # One run of a resumed model is enough: the oldest run counts.
  v = report.check(_prov(second), _inputs(gate=[first, second]), repo_, needs_inputs=True)
  assert v.stale.startswith("input `gate`: its code differs") and "1 commit changed" in v.stale
  # The furthest behind is named (unknown before dated), with how many more are stale.
  v = report.check(_prov(first), _inputs(experts=None, student=first), repo_, needs_inputs=True)
  assert v.stale == "input `experts`: no provenance (2 more of its 3 provenances stale)"
  # A result computed from models must say whose code trained them; a benchmark need not.
  v = report.check(_prov(second), None, repo_, needs_inputs=True)
  assert v.stale is not None and "inputs" in v.stale
  assert report.check(_prov(second), None, repo_, needs_inputs=False).stale is None
  # Unknown dirtiness, its own or an input's, is a warning naming each.
  copied = {"experts": [_prov(second, dirty=None)]}
  v = report.check(_prov(second, dirty=None), copied, repo_, needs_inputs=True)
  assert v.stale is None and v.warning.endswith("for this result, input `experts`")


def test_stale_reason_lists_at_most_five(repo):
  r, first, _ = repo
  for i in range(6):
    _commit(r, "launch/main.py", f"from robust_gate import a  # {i}\n", f"launch change {i}")
  reason = report.stale_reason(_prov(first), str(r))
  assert "7 commits" in reason and "and 2 more" in reason
  assert "launch change 5" in reason and "change the code" not in reason


def test_only_the_files_a_command_ran_make_its_result_stale(repo):
  """A result's code is its launcher, the robust_gate modules it imports (through each
  other too) and the configs: a commit to a module it never imports leaves it current;
  one to an imported module, however indirectly, or to a config makes it stale; a
  command naming no launcher of the checkout counts every commit to CODE_PATHS."""
  r, _, _ = repo
  _commit(r, "src/robust_gate/__init__.py", "", "package")
  _commit(r, "src/robust_gate/b.py", "import robust_gate.a\n", "b imports a")
  launcher = 'from robust_gate import b\nDEFAULT = "configs/digits.py"  # not there yet\n'
  ran = _commit(r, "launch/main.py", launcher, "the launcher")
  assert staleness.code_files("main.py --workdir=/w", str(r)) == (
    "launch/main.py",
    "src/robust_gate/__init__.py",
    "src/robust_gate/a.py",
    "src/robust_gate/b.py",
    "launch/configs",
  )
  _commit(r, "src/robust_gate/other.py", "y = 1\n", "a module main.py never imports")
  _commit(r, "launch/sample.py", "from robust_gate import other\n", "another launcher")
  assert report.stale_reason(_prov(ran), str(r)) is None
  sample = {**_prov(ran), "command": "sample.py --workdir=/w"}
  assert "2 commits changed the files it ran since" in report.stale_reason(sample, str(r))
  # Comments, docstrings and layout are not code: the syntax trees are compared.
  doc = '"""What a is."""\n\n# x is two\nx = (\n  2\n)\n'
  _commit(r, "src/robust_gate/a.py", doc, "document a")
  assert report.stale_reason(_prov(ran), str(r)) is None
  _commit(r, "src/robust_gate/a.py", "x = 3\n", "change what b imports")
  assert "2 commits changed the files it ran since" in report.stale_reason(_prov(ran), str(r))
  later = _commit(r, "launch/configs/digits.py", "c = 1\n", "a config")
  assert staleness._syntax("c = 1  # one\n") == staleness._syntax('"""Doc."""\nc = 1\n')
  assert staleness._syntax("c = 2\n") != staleness._syntax("c = 1\n")
  assert staleness._syntax("c = (\n") is None
  assert "a config" in report.stale_reason(_prov(ran), str(r))
  unknown = {**_prov(later), "command": "gone.py --workdir=/w"}
  _commit(r, "src/robust_gate/other.py", "y = 2\n", "touch other")
  assert "changed src/robust_gate, launch since:" in report.stale_reason(unknown, str(r))


def _method(loss, worst) -> dict:
  return {
    "domain_loss": dict(zip(("a", "b"), loss)),
    "domain_ce": dict(zip(("a", "b"), loss)),
    "mean": sum(loss) / 2,
    "worst_case": worst,
  }


def _write(path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _with_intervals(results) -> dict:
  """`results` as evaluate.results_on_test writes it: intervals, paired differences
  from the robust gate, a third method within its noise, the certificate."""
  methods = {
    **results["methods"],
    "best_response": _method([0.005, 0.03], 0.03),
  }
  intervals = {
    "robust_gate": ([0.008, 0.012], [0.021, 0.026], [0.016, 0.018], [0.02, 0.03]),
    "monolithic": ([0.45, 0.55], [0.1, 0.15], [0.3, 0.33], [0.48, 0.55]),
    "best_response": ([0.004, 0.006], [0.02, 0.04], [0.014, 0.02], [0.02, 0.04]),
  }
  paired = {
    "robust_gate": [0.0, 0.0, 0.0],
    "monolithic": [0.4888889, 0.45, 0.52],
    "best_response": [0.0065433, -0.004, 0.015],
  }
  for name, (a, b, mean, worst) in intervals.items():
    methods[name] = {
      **methods[name],
      "intervals": {"domain_loss": {"a": a, "b": b}, "mean": mean, "worst_case": worst},
      "vs_robust_gate": {"worst_case": paired[name], "mean": [0.0, 0.0, 0.0]},
    }
  return {
    **results,
    "methods": methods,
    "bootstrap": {
      "resamples": 1000,
      "level": 0.95,
      "over": "test sequences, resampled within each domain",
      "seed": 0,
    },
    "certificate": {
      "upper": [0.0234567, 0.02, 0.03],
      "lower": [0.018, 0.015, 0.021],
      "gap": [0.0054567, 0.003, 0.009],
      "lower_is_estimate": True,
      "lambda_bar": results["lambda_bar"],
      "lambda_worst": {"a": 0.0, "b": 1.0},
    },
    "lambda_rank_correlation": 1.0,
  }


def _workdirs(tmp_path, first, second):
  """A current main job with an experiment, a stale one without provenance, a benchmark."""
  results = {
    "units": "bits/token",
    "baseline": "expert",
    "uncertainty": "simplex",
    "dataset": "markov",
    "domains": ["a", "b"],
    "lambda_bar": {"a": 0.25, "b": 0.75},
    "lambda_last": {"a": 0.3, "b": 0.7},
    "methods": {
      "robust_gate": _method([0.01, 0.0234567], 0.0234567),
      "monolithic": _method([0.5, 0.125], 0.5123456),
    },
    "num_params": {"expert": 100, "gate": 7},
    "student_init": "b",  # an older results.json: no student_weights
  }
  cur = tmp_path / "rg_cur"
  models = _inputs(experts=second, robust_gate=second)
  _write(
    cur / "results.json",
    {
      **_with_intervals(results),
      "student_weights": "uniform",
      "provenance": _prov(second),
      provenance.INPUTS_KEY: models,
    },
  )
  (cur / "lambda.png").write_bytes(_PNG)
  mix = {
    "experiment": "mixtures",
    "provenance": _prov(first, device="8 × cpu"),
    provenance.INPUTS_KEY: models,
    "grid_points": 5,
    "methods": {"robust_gate": {"grid_worst": 0.0711, "late": [1.5, 0.25]}},
    "runs": [{"hidden": 4, "curve": [[0, 1.0]]}],
  }
  _write(cur / "experiments" / "mixtures.json", mix)
  (cur / "experiments" / "mixtures.png").write_bytes(_PNG)
  old = tmp_path / "rg_old"
  _write(old / "results.json", results)
  bench = tmp_path / "bench"
  _write(
    bench / "benchmark.json",
    {
      "provenance": _prov(second, device="1 × NVIDIA H200"),
      "config": {"d_model": 64},
      "xla_flags": "",
      "measurements": {"gate": {"robust_step_seconds": 4.3e-5, "ratio": 1.01}},
      "profiles": {
        "gate": {"device_seconds": 2e-5, "num_ops": 3, "by_kind": {"matmul": 1.5e-5}, "ops": []}
      },
    },
  )
  return cur, old, bench


def test_generate(tmp_path, repo):
  r, first, second = repo
  cur, old, bench = _workdirs(tmp_path, first, second)
  out = tmp_path / "docs"
  cmd = "python launch/report.py --workdirs=x --out=docs"
  args = ([str(cur), str(old)], [str(bench)], str(out), cmd, str(r))
  written = report.generate(*args)
  assert written == [str(out / "results.md"), str(out / "performance.md")]
  page = (out / "results.md").read_text()
  perf = (out / "performance.md").read_text()
  banner = f"Generated by `{cmd}` at `{second[:7]}`; do not edit by hand."
  assert page.startswith(banner) and perf.startswith(banner)
  # Every number to 4 decimals, with the interval the JSON gives, and how many seeds.
  cur_section, old_section = page.split("## rg_old")
  summary = "| robust_gate | 0.0167 [0.0160, 0.0180] | 0.0235 [0.0200, 0.0300] |"
  assert summary in cur_section
  assert "| monolithic | 0.5000 [0.4500, 0.5500] | 0.1250 [0.1000, 0.1500] |" in cur_section
  assert "| best response to λ̄ | 0.0175 [0.0140, 0.0200] | 0.0300 [0.0200, 0.0400] |" in page
  assert "1 training seed; intervals over test sequences. Every [lo, hi] is a 95% " in page
  assert "1000 bootstrap resamples of the test sequences, resampled within each domain" in page
  # Which differences from the robust gate exceed their noise, one line per method.
  assert (
    "- monolithic: +0.4889 [+0.4500, +0.5200]: exceeds its noise (the robust gate is better)."
  ) in page
  assert (
    "- best response to λ̄: +0.0065 [-0.0040, +0.0150]: within its noise (the interval contains 0)."
  ) in page
  assert "- robust_gate:" not in page
  assert "Better than the robust gate beyond noise" not in page  # none is
  assert "Differences that exceed their noise: 1 of 2 (monolithic); 1 training seed" in page
  # The certificate with its intervals; the lower value is marked as an estimate.
  assert "| upper U = max over Λ of Σ λ_k L_k(robust gate) | 0.0235 | [0.0200, 0.0300] |" in page
  assert "| lower ℓ(λ̄), an estimate | 0.0180 | [0.0150, 0.0210] |" in page
  assert "| gap U − ℓ | 0.0055 | [0.0030, 0.0090] |" in page
  assert "The lower value is an estimate" in page
  assert "| λ attaining U | 0.0000 | 1.0000 |" in page
  assert (
    "The gap exceeds its noise (0.0055 [0.0030, 0.0090]): the robust gate is not at the game's "
    "equilibrium on held-out data, so other gates can beat its worst case. λ̄ puts 0.75 on b, "
    "while the worst λ for its losses puts 1.00 on b"
  ) in page
  assert "on test: +1.000 over 2 domains (a point estimate without an interval; 1 training" in page
  # An older results.json renders its point estimates and says it has no intervals.
  assert "No intervals: this results.json predates them" in old_section
  assert "| monolithic | 0.3125 | 0.5123 |" in old_section
  assert "[" not in old_section.split("No intervals")[1].split("| robust gate |")[0]
  assert "certificate" not in old_section and "exceeds" not in old_section
  assert f"## rg_cur: markov, config digits.py — commit `{second[:7]}`, 1 × H100" in page
  assert "## rg_old: markov, config unknown — commit `unknown`, unknown" in page
  assert "| λ̄ (average) | 0.2500 | 0.7500 |" in page
  # How each main job's student was distilled; the older file's weights were λ̄.
  assert "- student: from the b expert, domains weighted uniform" in cur_section
  assert "- student: from the b expert, domains weighted lam_bar (not recorded)" in old_section
  # STALE exactly twice: the experiment made before the code changed, and rg_old.
  assert page.count("STALE") == 2
  assert f"### Experiment `mixtures` (rg_cur) — commit `{first[:7]}`, 8 × cpu" in page
  stale_exp = page.split("### Experiment `mixtures`")[1]
  assert (
    "STALE**: its code differs" in stale_exp
    and "1 commit changed" in stale_exp
    and "change the code" in stale_exp
  )
  assert "**STALE**: no provenance" in page.split("## rg_old")[1]
  assert "STALE" not in page.split("## rg_cur")[1].split("### Experiment")[0]
  assert f"- inputs made at: `{second[:7]}`: experts, robust_gate" in page
  assert "WARNING" not in page
  # Figures copied and linked; the experiment's body as tables.
  for rel in ("figures/rg_cur/lambda.png", "figures/rg_cur/experiments/mixtures.png"):
    assert f"]({rel})" in page and (out / rel).read_bytes() == _PNG
  assert "| robust_gate | 0.0711 | 1.5000, 0.2500 |" in page
  assert "| grid_points | 5 |" in page and "`runs[].curve`" in page
  # The benchmark's measurements with units.
  assert "| robust_step_seconds | 43 | µs |" in perf and "| ratio | 1.01 | × |" in perf
  assert "| kind: matmul | 15 | µs |  |" in perf
  assert "STALE" not in perf and "1 × NVIDIA H200" in perf
  # Deterministic: the same inputs write the same bytes.
  report.generate(*args)
  assert (out / "results.md").read_text() == page
  assert (out / "performance.md").read_text() == perf


def test_generate_replaces_old_figures(tmp_path, repo):
  r, first, second = repo
  cur, _, _ = _workdirs(tmp_path, first, second)
  out = tmp_path / "docs"
  (out / "figures" / "gone").mkdir(parents=True)
  (out / "figures" / "gone" / "old.png").write_bytes(_PNG)
  (out / "figures" / "notes.txt").write_text("not a figure")
  report.generate([str(cur)], [], str(out), "cmd", str(r))
  assert not (out / "figures" / "gone").exists()
  assert (out / "figures" / "notes.txt").exists() and (out / "figures" / "rg_cur").is_dir()
  assert not (out / "performance.md").exists()


def test_generate_failing_midway_keeps_the_old_figures(tmp_path, repo, monkeypatch):
  """The old figures are removed only after the new figures and pages are written."""
  r, first, second = repo
  cur, _, _ = _workdirs(tmp_path, first, second)
  out = tmp_path / "docs"
  (out / "figures" / "gone").mkdir(parents=True)
  (out / "figures" / "gone" / "old.png").write_bytes(_PNG)
  (out / "results.md").write_text("the committed page\n")
  real_write = report.files.atomic_write

  def failing_write(path, content):
    if path.endswith("results.md"):
      raise OSError("disk full")
    real_write(path, content)

  monkeypatch.setattr(report.files, "atomic_write", failing_write)
  with pytest.raises(OSError, match="disk full"):
    report.generate([str(cur)], [], str(out), "cmd", str(r))
  assert (out / "figures" / "gone" / "old.png").read_bytes() == _PNG
  assert (out / "results.md").read_text() == "the committed page\n"


def test_generate_warns_of_unknown_dirtiness(tmp_path, repo):
  """A result from a copied tree (dirty None) is current but carries a WARNING."""
  r, _, second = repo
  w = tmp_path / "remote"
  body = {"steps": 4, "provenance": _prov(second, dirty=None)}
  _write(w / "experiments" / "ema.json", {**body, provenance.INPUTS_KEY: _inputs(gate=second)})
  page = pages.results_page(report.inputs.read_results([str(w)], str(r)), "h")[0]
  assert "STALE" not in page and page.count("WARNING") == 1
  assert "**WARNING**: whether the code had uncommitted changes is unknown" in page
  assert f"- commit: `{second}` (uncommitted changes unknown)" in page


def test_experiments_in_old_location(tmp_path, repo):
  r, _, second = repo
  w = tmp_path / "w"
  _write(w / "paper" / "prune.json", {"threshold": 0.02, "path": [{"test_worst": 0.5}]})
  _write(w / "paper" / "ema.json", {"steps": 3})
  _write(w / "experiments" / "ema.json", {"steps": 4, "provenance": _prov(second)})
  page, _ = pages.results_page(report.inputs.read_results([str(w)], str(r)), "h")
  assert "experiments only" in page and "| steps | 4 |" in page and "| steps | 3 |" not in page
  assert page.index("`prune`") < page.index("`ema`")  # robust_gate.experiments' order


def test_input_errors(tmp_path, repo):
  r = str(repo[0])
  with pytest.raises(InputError, match="not a directory"):
    report.generate([str(tmp_path / "missing")], [], str(tmp_path / "o"), "c", r)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match=r"results\.json: no such file"):
    report.generate([str(tmp_path / "empty")], [], str(tmp_path / "o"), "c", r)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "results.json").write_text("{not json")
  with pytest.raises(InputError, match=r"results\.json: not valid JSON"):
    report.generate([str(tmp_path / "bad")], [], str(tmp_path / "o"), "c", r)
  with pytest.raises(InputError, match=r"benchmark\.json: no such file"):
    report.generate([], [str(tmp_path / "empty")], str(tmp_path / "o"), "c", r)
  assert not (tmp_path / "o").exists()  # nothing written when an input is bad


@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("step_seconds", 0.0123, ("12.3", "ms")),
    ("tokens_per_s", 3.4e6, ("3.4", "Mtokens/s")),
    ("model_flops_per_s", 3.43e14, ("343", "TFLOP/s")),
    ("model_flops_per_step", 2e9, ("2", "GFLOP")),
    ("peak_bytes", 3 * 2**30, ("3", "GiB")),
    ("mfu", 0.42, ("42", "%")),
    ("speedup_unroll4", 7.9, ("7.9", "×")),
    ("params_per_expert", 25, ("25", "")),
    ("serial_bitwise_equal", True, ("yes", "")),
    ("student_tokens_per_second", 3.4e6, ("3.4", "Mtokens/s")),
    ("model_tflops", 343.2, ("343.2", "TFLOP/s")),
    ("robust_over_erm", 1.01, ("1.01", "×")),
    ("peak_memory_bytes", None, ("—", "")),
  ],
)
def test_measurement_units(key, value, expected):
  assert tables.measurement(key, value) == expected


def test_launcher(tmp_path, repo):
  _, first, second = repo
  cur, _, bench = _workdirs(tmp_path, first, second)
  out = tmp_path / "docs"
  argv = [sys.executable, "launch/report.py", f"--workdirs={cur}", f"--bench_workdirs={bench}"]
  run = subprocess.run([*argv, f"--out={out}"], capture_output=True, text=True, cwd=report.REPO)
  assert run.returncode == 0, run.stderr
  cmd = f"python launch/report.py --workdirs={cur} --bench_workdirs={bench} --out={out}"
  assert (out / "results.md").read_text().startswith(f"Generated by `{cmd}` at `")
  bad = subprocess.run(
    [*argv[:2], f"--workdirs={tmp_path}/nope", f"--out={out}"],
    capture_output=True,
    text=True,
    cwd=report.REPO,
  )
  assert bad.returncode == 1 and bad.stderr.strip().endswith("is not a directory.")
  assert "Traceback" not in bad.stderr


def test_body_tables_nested_and_wide():
  """jsd's shape: records holding per-model dicts; a wide table is transposed."""
  models = {m: {f"f{i}": 0.5 * i for i in range(6)} for m in ("monolithic", "robust_gate")}
  body = {"similarities": [0.0, 1.0], "runs": [{"similarity": 0.0, "models": models}]}
  text = "\n".join(tables.body_tables(body))
  assert "| similarities | 0.0000, 1.0000 |" in text
  assert "| field | 1 |" in text and "| models.robust_gate.f5 | 2.5000 |" in text
  assert "Not shown" not in text


def test_the_gap_reading_says_whether_the_gate_is_at_equilibrium():
  from robust_gate.report import held_out

  at = held_out._gap_reading({"gap": [0.001, -0.002, 0.004]})
  assert at[0].startswith("The gap's interval reaches 0")
  off = held_out._gap_reading(
    {
      "gap": [0.05, 0.04, 0.06],
      "lambda_bar": {"x": 0.9, "y": 0.1},
      "lambda_worst": {"x": 0.0, "y": 1.0},
    }
  )
  assert "not at the game's equilibrium" in off[0]
  assert "λ̄ puts 0.90 on x, while the worst λ for its losses puts 1.00 on y" in off[0]


def test_a_named_config_counts_with_the_configs_it_loads_and_no_other(repo):
  r, _, _ = repo
  _commit(r, "launch/configs/base.py", "c = 1\n", "base config")
  _commit(r, "launch/configs/top.py", 'load("base.py")\n', "top loads base")
  ran = _commit(r, "launch/main.py", "x = 1\n", "the launcher")
  prov = {**_prov(ran), "command": "main.py --config=launch/configs/top.py --workdir=/w"}
  assert staleness.code_files(prov["command"], str(r)) == (
    "launch/configs/base.py",
    "launch/configs/top.py",
    "launch/main.py",
  )
  _commit(r, "launch/configs/other.py", "c = 2\n", "a config it never reads")
  assert report.stale_reason(prov, str(r)) is None
  _commit(r, "launch/configs/base.py", "c = 3\n", "the config top loads")
  assert "the config top loads" in report.stale_reason(prov, str(r))
  outside = {**prov, "command": "main.py --config=/elsewhere/top.py"}  # cannot tell: all count
  assert staleness.code_files(outside["command"], str(r))[-1] == "launch/configs"
  _commit(r, "launch/bench.py", "y = 1\n", "a launcher that reads no config")
  assert staleness.code_files("bench.py --workdir=/w", str(r)) == ("launch/bench.py",)


def test_an_experiment_s_result_depends_on_its_own_module_not_the_others(repo):
  """launch/experiment.py imports the experiment `--experiment=` names, and only it:
  a commit to another experiment, or a new one, leaves the result current."""
  r, _, _ = repo
  _commit(r, "src/robust_gate/__init__.py", "", "package")
  _commit(r, "src/robust_gate/experiments/__init__.py", "import robust_gate.a\n", "registry")
  _commit(r, "src/robust_gate/experiments/one.py", "from robust_gate import b\n", "one")
  _commit(r, "src/robust_gate/b.py", "y = 1\n", "b")
  ran = _commit(r, "launch/experiment.py", "from robust_gate import experiments\n", "launcher")
  prov = {**_prov(ran), "command": "experiment.py --experiment=one --workdir=/w"}
  assert staleness.code_files(prov["command"], str(r)) == (
    "launch/experiment.py",
    "src/robust_gate/__init__.py",
    "src/robust_gate/a.py",
    "src/robust_gate/b.py",
    "src/robust_gate/experiments/__init__.py",
    "src/robust_gate/experiments/one.py",
  )
  spaced = "experiment.py --experiment one --workdir=/w"  # absl takes the value either way
  assert staleness.code_files(spaced, str(r)) == staleness.code_files(prov["command"], str(r))
  _commit(r, "src/robust_gate/experiments/two.py", "z = 1\n", "another experiment")
  assert report.stale_reason(prov, str(r)) is None
  _commit(r, "src/robust_gate/b.py", "y = 2\n", "what one imports")
  assert "what one imports" in report.stale_reason(prov, str(r))
  # An experiment the checkout does not have (renamed, deleted, misspelled, none named):
  # what it ran cannot be told, so every commit to the code counts.
  for unknown in ("--experiment=two_", "--experiment=../b", "--experiment", ""):
    assert staleness.code_files(f"experiment.py {unknown} --workdir=/w", str(r)) is None
  _git(r, "rm", "-q", "src/robust_gate/experiments/one.py")
  _git(r, "commit", "-q", "-m", "one removed")
  assert staleness.code_files(prov["command"], str(r)) is None
  assert "changed src/robust_gate, launch since" in report.stale_reason(prov, str(r))


def test_a_model_better_than_the_robust_gate_is_shown_against_the_experts():
  """A model below the robust gate beyond noise is named; a mixture of the same experts
  points to the certificate, and a single model, where b_k is each domain's expert, is
  shown with the domains where it is below the experts themselves (L_k < 0)."""
  from robust_gate.report import held_out

  results = {
    "baseline": "expert",
    "bootstrap": {"level": 0.95},
    "gate_usage": {"robust_gate": [], "erm_gate": []},
    "methods": {
      "robust_gate": {**_method([-0.01, 0.03], 0.03), "vs_robust_gate": {"worst_case": [0, 0, 0]}},
      "monolithic": {
        **_method([-0.2, -0.02], -0.02),
        "vs_robust_gate": {"worst_case": [-0.05, -0.06, -0.04]},
      },
      "student": {
        **_method([0.0, 0.05], 0.05),
        "vs_robust_gate": {"worst_case": [0.02, -0.01, 0.05]},
      },
      "erm_gate": {
        **_method([-0.1, 0.01], 0.01),
        "vs_robust_gate": {"worst_case": [-0.02, -0.03, -0.01]},
      },
      "expert:a": {
        **_method([0.0, 0.02], 0.02),
        "vs_robust_gate": {"worst_case": [-0.01, -0.02, -0.005]},
      },
    },
  }
  text = "\n".join(held_out.differences(results))
  assert (
    "Better than the robust gate beyond noise: monolithic, erm_gate, expert:a. erm_gate, "
    "expert:a mix the same experts: a lower worst case among such mixtures is what the "
    "certificate's gap (below) measures. With b_k the loss of domain k's own expert, L_k < "
    "0 is a model better than that expert on its own domain: monolithic on 2 of 2 domains, "
    "by up to 0.2000; robust_gate on 1 of 2 domains, by up to 0.0100. A gate goes below an "
    "expert on its own domain only as far as mixing in the other experts takes it; a single "
    "model trained on every domain is bound by no expert."
  ) in text
  results["baseline"] = "entropy"  # L_k < 0 says nothing about the experts then
  text = "\n".join(held_out.differences(results))
  assert "Better than the robust gate beyond noise: monolithic, erm_gate, expert:a." in text
  assert "L_k < 0" not in text


def test_the_student_is_set_against_the_single_models_of_its_size_by_their_intervals():
  """Disjoint intervals: lower or higher beyond noise; overlapping: not told apart; a
  rival without a finite interval is shown without one; a student without an interval,
  or no student, gives no line."""
  from robust_gate.report import held_out

  def method(worst, low, high):
    return {"worst_case": worst, "intervals": {"worst_case": [low, high]}}

  results = {
    "methods": {
      "student": method(-0.10, -0.13, -0.08),
      "monolithic": method(0.17, 0.15, 0.20),
      "monolithic_dro": method(-0.09, -0.12, -0.05),
    }
  }
  text = " ".join(held_out.student_against_its_size(results))
  assert "student -0.1000 [-0.1300, -0.0800]" in text
  assert "monolithic 0.1700 [0.1500, 0.2000] (the student is lower, beyond noise)" in text
  assert "monolithic_dro -0.0900 [-0.1200, -0.0500] (the intervals overlap" in text
  assert "1 training seed" in text
  results["methods"]["monolithic"] = method(-0.3, -0.35, -0.25)
  text = " ".join(held_out.student_against_its_size(results))
  assert "(the student is higher, beyond noise)" in text
  results["methods"]["monolithic"] = method(0.17, float("nan"), float("nan"))
  text = " ".join(held_out.student_against_its_size(results))
  assert "monolithic 0.1700 (no interval)" in text  # never read as an overlap
  del results["methods"]["student"]["intervals"]
  assert held_out.student_against_its_size(results) == []
  del results["methods"]["student"]
  assert held_out.student_against_its_size(results) == []


def test_kept_inputs_regenerate_the_same_pages(tmp_path, repo):
  """--keep copies what the pages read into one folder; the pages generated from the
  copies equal those from the workdirs, but for the paths they name."""
  _, first, second = repo
  cur, _, bench = _workdirs(tmp_path, first, second)
  (cur / "experts").mkdir()
  (cur / "experts" / "params.bin").write_bytes(b"\0" * 64)  # not an input of the pages
  keep = tmp_path / "kept"
  (keep / "rg_cur").mkdir(parents=True)
  (keep / "rg_cur" / "old.json").write_text("{}")  # an earlier copy's file: replaced
  argv = [sys.executable, "launch/report.py", f"--workdirs={cur}", f"--bench_workdirs={bench}"]
  run = subprocess.run(
    [*argv, f"--out={tmp_path / 'a'}", f"--keep={keep}"],
    capture_output=True,
    text=True,
    cwd=report.REPO,
  )
  assert run.returncode == 0, run.stderr
  kept = sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file())
  assert kept == [
    "bench/benchmark.json",
    "rg_cur/experiments/mixtures.json",
    "rg_cur/experiments/mixtures.png",
    "rg_cur/lambda.png",
    "rg_cur/results.json",
  ]
  page = (tmp_path / "a" / "results.md").read_text()
  cmd = f"python launch/report.py --workdirs={keep / 'rg_cur'} --bench_workdirs={keep / 'bench'}"
  assert page.startswith(f"Generated by `{cmd} --out={tmp_path / 'a'}` at `")
  # Generated again from the copies alone (the workdir gone): the same page.
  shutil.rmtree(cur)
  args = [str(keep / "rg_cur")], [str(keep / "bench")], str(tmp_path / "b"), "c", report.REPO
  report.generate(*args)
  again = (tmp_path / "b" / "results.md").read_text()
  assert again.split("\n", 1)[1] == page.split("\n", 1)[1]
  assert report.keep(*args[:2], str(keep), report.REPO) == args[:2]  # its own copy: as is


def test_keep_writes_nothing_when_an_input_is_unreadable_or_names_clash(
  tmp_path, repo, monkeypatch
):
  r, first, second = repo
  cur, old, bench = _workdirs(tmp_path, first, second)
  keep = tmp_path / "kept"
  real = report.inputs.read_bytes

  def failing(path):
    if path.endswith("mixtures.png"):
      raise InputError(f"{path}: cannot be read (Permission denied).")
    return real(path)

  monkeypatch.setattr(report.inputs, "read_bytes", failing)
  with pytest.raises(InputError, match=r"mixtures\.png: cannot be read"):
    report.keep([str(old), str(cur)], [], str(keep), str(r))  # rg_old's copy would come first
  assert not keep.exists()
  monkeypatch.setattr(report.inputs, "read_bytes", real)
  clash = tmp_path / "x" / "rg_cur"
  shutil.copytree(bench, clash)
  with pytest.raises(InputError, match="has the name 'rg_cur' of a main-job workdir"):
    report.keep([str(cur)], [str(clash)], str(keep), str(r))
  assert not keep.exists()


def test_runs_of_one_config_are_pooled_over_seeds_and_stale_ones_left_out(tmp_path, repo):
  r, first, second = repo
  cur, _, _ = _workdirs(tmp_path, first, second)
  body = {k: v for k, v in json.loads((cur / "results.json").read_text()).items()}

  def run(name, seed, commit, worst, device="1 × H100", paired=None):
    prov = {**_prov(commit, device=device), "config": {"seed": seed, "data_dir": f"/d{seed}"}}
    methods = json.loads(json.dumps(body["methods"]))
    methods["robust_gate"]["worst_case"] = worst
    if paired is not None:
      methods["monolithic"]["vs_robust_gate"]["worst_case"] = paired
    _write(
      tmp_path / name / "results.json",
      {**body, "methods": methods, "provenance": prov, provenance.INPUTS_KEY: _inputs(x=commit)},
    )
    return str(tmp_path / name)

  dirs = [
    run("s0", 0, second, 0.02),
    run("s1", 1, second, 0.04, paired=[-0.1, -0.2, -0.05]),  # monolithic better here
    run("s2", 2, first, 0.9),  # stale: the code changed after it
    run("other_device", 3, second, 0.5, device="8 × cpu"),
  ]
  out = tmp_path / "docs"
  report.generate(dirs, [], str(out), "cmd", str(r))
  page = (out / "results.md").read_text()
  assert page.count("## Over runs:") == 1
  pooled = page.split("## Over runs: markov, config digits.py")[1].split("\n## ")[0]
  assert "2 runs of one config (`s0`, `s1`) on 1 × H100: seeds 0, 1," in pooled
  assert "which is training's (initialization, minibatches)." in pooled
  assert "Left out as STALE: `s2`." in pooled
  assert "other_device" not in pooled
  # mean ± sample sd of 0.02 and 0.04, lowest in s0 only (best response's 0.03 is below
  # 0.04 in s1); in one run the robust gate is better beyond noise than monolithic, in the
  # other monolithic is; best response is within noise in both.
  assert "| robust_gate | 0.0300 ± 0.0141 | 0.0200 | 0.0400 | 1 | — | — |" in pooled
  assert "| monolithic | 0.5123 ± 0.0000 | 0.5123 | 0.5123 | 0 | 1 | 1 |" in pooled
  assert "| best response to λ̄ | 0.0300 ± 0.0000 | 0.0300 | 0.0300 | 1 | 0 | 0 |" in pooled
  assert "lowest of these 3 methods in 1 of 2 runs, and below every other's beyond noise in 0" in (
    pooled
  )
  # Runs of one seed only: their spread is the device's nondeterminism, and said so.
  again = [run("t0", 0, second, 0.02), run("t0_again", 0, second, 0.021)]
  report.generate(again, [], str(out), "cmd", str(r))
  page = (out / "results.md").read_text()
  assert "seeds 0, 0," in page
  assert "which is the device's run-to-run nondeterminism alone, as every run has the same" in page


def test_the_modular_overhead_is_extrapolated_with_the_gate_s_seconds_held():
  res = {
    "modular_overhead": 0.3,
    "seconds_per_model": {"experts": 100.0, "caches": 20.0, "robust_gate": 10.0},
    "num_params": {"expert": 7_000_000},
  }
  lines = pages._overhead(res)
  measured = "Overhead of being modular, (caches + robust gate) / experts in wall seconds: 0.300."
  assert lines[0] == measured
  # 0.2 + 0.1 × 7M / 7B = 0.2001: the caches' share stays, the gate's shrinks 1000-fold.
  assert "caches / experts 0.200 + robust gate / experts 0.100 × 7M / 7B = 0.200." in lines[1]
  # Without the seconds or the parameters: the measured fraction alone; without it, nothing.
  assert pages._overhead({**res, "num_params": {}}) == [measured, ""]
  assert pages._overhead({"seconds_per_model": res["seconds_per_model"]}) == []
