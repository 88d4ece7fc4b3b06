"""results.json's held-out numbers as markdown (docs/math.md §6–§8): every method with its
intervals, its paired difference from the robust gate, the certificate, λ̄.

Every claim carries its interval and the number of training seeds behind it; a
results.json written before the intervals renders its point estimates and says that
they have none.
"""

import math
from typing import Any

from robust_gate.evaluate import REFERENCE
from robust_gate.experiments.student_size import SAME_SIZE
from robust_gate.report.tables import table
from robust_gate.summary import method_label

_SUMMARY = (("mean", "mean over domains"), ("worst_case", "worst case over Λ"))


def seeds(results: dict[str, Any]) -> int:
  """The training seeds behind the numbers: one main job is one seed."""
  found = results.get("seeds", results.get("num_seeds", 1))
  return len(found) if isinstance(found, list) else int(found)


def _trained(results: dict[str, Any]) -> str:
  n = seeds(results)
  return f"{n} training seed{'s' if n != 1 else ''}"


def _bounds(found: Any) -> list[float] | None:
  """An interval [lo, hi] of finite numbers, else None."""
  ok = isinstance(found, list) and len(found) == 2
  return (
    found if ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in found) else None
  )


def _bracket(low_high: list[float], sign: str = "") -> str:
  return f"[{low_high[0]:{sign}.4f}, {low_high[1]:{sign}.4f}]"


def _value(entry: dict[str, Any], metric: str, domain: str | None = None) -> str:
  """`entry[metric]` (of `domain`) to 4 decimals, with its interval where the JSON has one."""
  found = (entry.get("intervals") or {}).get(metric)
  if domain is None:
    v = entry[metric]
  else:
    v, found = entry[metric][domain], (found or {}).get(domain)
  bounds = _bounds(found)
  return f"{v:.4f}" + (f" {_bracket(bounds)}" if bounds else "")


def _level(results: dict[str, Any]) -> str:
  return f"{100 * results['bootstrap']['level']:g}%"


def intervals_note(results: dict[str, Any]) -> list[str]:
  """What the intervals cover, with the seed count; or that there are none."""
  trained, boot = _trained(results), results.get("bootstrap")
  if not isinstance(boot, dict):
    return [
      f"No intervals: this results.json predates them, so every number in this section is a "
      f"point estimate on the test sequences without an error bar ({trained}).",
      "",
    ]
  return [
    f"{trained}; intervals over test sequences. Every [lo, hi] is a "
    f"{_level(results)} percentile interval over {boot['resamples']} bootstrap resamples of "
    f"the {boot['over']} (seed {boot['seed']}, docs/math.md §8): it covers the noise of the "
    "test set, not that of training.",
    "",
  ]


def method_tables(results: dict[str, Any]) -> list[str]:
  """Every method's mean and worst case, then its L_k per domain, each with its interval."""
  domains, methods = results["domains"], results["methods"]
  summary = [
    [method_label(name), *(_value(m, k) for k, _ in _SUMMARY)] for name, m in methods.items()
  ]
  per_domain = [
    [method_label(name), *(_value(m, "domain_loss", d) for d in domains)]
    for name, m in methods.items()
  ]
  return [
    *table(["method", *(title for _, title in _SUMMARY)], summary),
    "",
    *table(["method", *(f"L_k {d}" for d in domains)], per_domain),
    "",
  ]


def differences(results: dict[str, Any]) -> list[str]:
  """One line per method: its worst case minus the robust gate's, paired on the same
  resamples, and whether that difference exceeds its noise (its interval excludes 0)."""
  paired = {
    name: m["vs_robust_gate"]["worst_case"]
    for name, m in results["methods"].items()
    if name != REFERENCE and isinstance(m.get("vs_robust_gate"), dict)
  }
  if not paired:
    return []
  lines = [
    f"Worst case minus the robust gate's, paired on the same resamples (positive: the robust "
    f"gate is better), with its {_level(results)} interval; a difference exceeds its noise "
    "where the interval excludes 0:",
    "",
  ]
  beyond, better_than_gate = [], []
  for name, (point, low, high) in paired.items():
    if low > 0 or high < 0:
      beyond.append(method_label(name))
      if high < 0:
        better_than_gate.append(name)
      better = "the robust gate" if low > 0 else method_label(name)
      verdict = f"exceeds its noise ({better} is better)"
    else:
      verdict = "within its noise (the interval contains 0)"
    lines.append(f"- {method_label(name)}: {point:+.4f} {_bracket([low, high], '+')}: {verdict}.")
  listed = ", ".join(beyond) if beyond else "none"
  lines += [
    "",
    f"Differences that exceed their noise: {len(beyond)} of {len(paired)} ({listed}); "
    f"{_trained(results)}, intervals over test sequences.",
    "",
  ]
  return lines + _below_the_experts(results, better_than_gate)


def _below_the_experts(results: dict[str, Any], names: list[str]) -> list[str]:
  """Why models beat the robust gate beyond noise. A mixture of the same experts (a gate
  of `gate_usage`, the uniform mixture, the posterior gate, an expert alone) does where
  the robust gate is off its game's equilibrium, which the certificate's gap measures.
  A single model does, where b_k is each domain's own expert, by being below that
  expert on its own domain (L_k < 0): on how many domains, beside the robust gate."""
  if not names:
    return []
  mixtures = {*results.get("gate_usage", {}), "uniform_mixture", "posterior_gate"}
  is_mixture = lambda n: n in mixtures or n.startswith("expert:")  # an expert: a one-hot gate
  mixed = [n for n in names if is_mixture(n)]
  single = [n for n in names if not is_mixture(n)]
  lines = ["Better than the robust gate beyond noise: " + _labels(names) + "."]
  if mixed:
    lines.append(
      f"{_labels(mixed)} {'mixes' if len(mixed) == 1 else 'mix'} the same experts: a lower "
      "worst case among such mixtures is what the certificate's gap (below) measures."
    )
  if single and results.get("baseline") == "expert":

    def below(name: str) -> str:
      losses = results["methods"][name]["domain_loss"]
      under = [v for v in losses.values() if v < 0]
      most = f", by up to {-min(under):.4f}" if under else ""
      return f"{method_label(name)} on {len(under)} of {len(losses)} domains{most}"

    lines.append(
      "With b_k the loss of domain k's own expert, L_k < 0 is a model better than that "
      "expert on its own domain: "
      + "; ".join(below(n) for n in [*single, REFERENCE])
      + ". A gate goes below an expert on its own domain only as far as mixing in the "
      "other experts takes it; a single model trained on every domain is bound by no expert."
    )
  return [" ".join(lines), ""]


def student_against_its_size(results: dict[str, Any]) -> list[str]:
  """The student's worst case against each single model of its size, by their intervals:
  intervals that do not overlap make a difference beyond the test set's noise (a
  conservative test: the paired interval, in the `student_seeds` experiment, is
  narrower); overlapping ones leave it untold here."""
  methods = results["methods"]
  student = methods.get("student")
  rivals = [n for n in SAME_SIZE if n in methods]  # the single models of its size
  if student is None or not rivals:
    return []
  mine = _bounds((student.get("intervals") or {}).get("worst_case"))
  if mine is None:
    return []

  def against(name: str) -> str:
    theirs = _bounds((methods[name].get("intervals") or {}).get("worst_case"))
    if theirs is None:
      return f"{method_label(name)} {methods[name]['worst_case']:.4f} (no interval)"
    if mine[1] < theirs[0]:
      verdict = "the student is lower, beyond noise"
    elif theirs[1] < mine[0]:
      verdict = "the student is higher, beyond noise"
    else:
      verdict = "the intervals overlap: not told apart here"
    return f"{method_label(name)} {_value(methods[name], 'worst_case')} ({verdict})"

  return [
    f"The student (one expert's size) against the single models of its size, worst case: "
    f"student {_value(student, 'worst_case')}; "
    + "; ".join(against(n) for n in rivals)
    + f". Intervals that do not overlap are a conservative test; {_trained(results)}.",
    "",
  ]


def _labels(names: list[str]) -> str:
  return ", ".join(method_label(n) for n in names)


def certificate(results: dict[str, Any]) -> list[str]:
  """The robust gate's duality-gap certificate with its intervals (docs/math.md §7)."""
  c = results.get("certificate")
  if not isinstance(c, dict):
    return []
  lower = "lower ℓ(λ̄), an estimate" if c.get("lower_is_estimate") else "lower ℓ(λ̄)"
  rows = [
    [label, f"{v[0]:.4f}", _bracket(v[1:])]
    for label, v in (
      ("upper U = max over Λ of Σ λ_k L_k(robust gate)", c["upper"]),
      (lower, c["lower"]),
      ("gap U − ℓ", c["gap"]),
    )
  ]
  units = results.get("units", "")
  lines = [
    f"Duality-gap certificate of the robust gate (docs/math.md §7), {units}:",
    "",
    *table(["value", "point", f"{_level(results)} interval"], rows),
    "",
  ]
  if c.get("lower_is_estimate"):
    lines += [
      "The lower value is an estimate: the best response to λ̄ is a gate trained with λ fixed "
      "at λ̄ and scored on the test sequences. Its optimization error can only make ℓ too high "
      "and the gap too small; its sampling noise, either way, is in the intervals "
      "(docs/math.md §7.1).",
      "",
    ]
  return lines + _gap_reading(c)


def _gap_reading(c: dict[str, Any]) -> list[str]:
  """What the gap says about the robust gate, in one line: whether it exceeds its noise,
  and where λ̄ and the worst λ for the gate's losses disagree (docs/math.md §7)."""
  gap = c["gap"]
  if gap[1] <= 0:
    return [
      "The gap's interval reaches 0: on held-out data the robust gate is as good as the "
      "certificate can tell.",
      "",
    ]
  worst, bar = c.get("lambda_worst"), c.get("lambda_bar")
  where = ""
  if isinstance(worst, dict) and isinstance(bar, dict) and worst and bar:
    top = lambda lam: max(lam, key=lam.get)
    where = (
      f" λ̄ puts {bar[top(bar)]:.2f} on {top(bar)}, while the worst λ for its losses puts "
      f"{worst[top(worst)]:.2f} on {top(worst)}: the gate was trained toward a mixture "
      f"that is not the held-out worst one."
    )
  return [
    f"The gap exceeds its noise ({gap[0]:.4f} {_bracket(gap[1:])}): the robust gate is not "
    f"at the game's equilibrium on held-out data, so other gates can beat its worst case." + where,
    "",
  ]


def lambda_table(results: dict[str, Any]) -> list[str]:
  """λ̄, the last λ and the λ attaining the upper value, per domain."""
  found = {
    "λ̄ (average)": results.get("lambda_bar"),
    "λ (last iterate)": results.get("lambda_last"),
    "λ attaining U": (results.get("certificate") or {}).get("lambda_worst"),
  }
  rows = [
    [label, *(f"{lam[d]:.4f}" for d in results["domains"])]
    for label, lam in found.items()
    if isinstance(lam, dict)
  ]
  return [*table(["robust gate", *results["domains"]], rows), ""] if rows else []


def rank_correlation(results: dict[str, Any]) -> list[str]:
  """Whether λ̄ ranks the domains as the robust gate's held-out losses do."""
  if "lambda_rank_correlation" not in results:
    return []
  rho = results["lambda_rank_correlation"]
  value = "undefined (λ̄ or the losses are constant)" if rho is None else f"{rho:+.3f}"
  return [
    f"Spearman rank correlation of λ̄ with the robust gate's per-domain L_k on test: {value} "
    f"over {len(results['domains'])} domains (a point estimate without an interval; "
    f"{_trained(results)}).",
    "",
  ]


def section_body(results: dict[str, Any]) -> list[str]:
  """A results section's numbers, in page order."""
  units = results.get("units", "unknown units")
  return [
    f"Held-out loss L_k = CE − b_k per domain, {units}.",
    "",
    *intervals_note(results),
    *method_tables(results),
    *differences(results),
    *student_against_its_size(results),
    *certificate(results),
    *lambda_table(results),
    *rank_correlation(results),
  ]
