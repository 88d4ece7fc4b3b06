"""results.json for people: the printed table and the plots (`pipeline.evaluate_all`
writes both; robust_gate.evaluate computes what they show)."""

import os
import unicodedata

import numpy as np

from robust_gate import files
from robust_gate.evaluate import BEST_RESPONSE

# How tables name a method where its key in results.json does not say what it is.
_LABELS = {BEST_RESPONSE: "best response to λ̄"}


def method_label(name: str) -> str:
  """The name of method `name` on tables and pages."""
  return _LABELS.get(name, name)


def format_table(results: dict) -> str:
  """The printed summary of results.json: every method's L_k, mean and worst case with
  the worst case's interval, λ̄, the certificate with its intervals and λ̄'s rank
  correlation. Results written before intervals (an older workdir) print without them."""
  domains, units = results["domains"], results["units"]
  boot = results.get("bootstrap")
  title = f"per-domain loss L_k, {units} (baseline: {results['baseline']})"
  head = (
    f"{'method':22s}" + "".join(f"{d[:9]:>10s}" for d in domains) + f"{'mean':>10s}{'worst':>10s}"
  )
  if boot:
    title += f"; intervals over {boot['over']} ({boot['resamples']} resamples)"
    head += f"  {100 * boot['level']:g}% interval"
  lines = [title, head, "-" * len(head)]
  for name, m in results["methods"].items():
    worst = m.get("intervals", {}).get("worst_case")
    lines.append(
      _padded(method_label(name), 22)
      + "".join(f"{m['domain_loss'][d]:10.4f}" for d in domains)
      + f"{m['mean']:10.4f}{m['worst_case']:10.4f}"
      + (f"  {_bracket(worst)}" if worst else "")
    )
  lines.append(
    "λ̄ (robust gate): " + ", ".join(f"{d}={w:.3f}" for d, w in results["lambda_bar"].items())
  )
  if "certificate" in results:
    c = results["certificate"]
    lower = "lower (estimate)" if c["lower_is_estimate"] else "lower"
    values = [("upper", c["upper"]), (lower, c["lower"]), ("gap", c["gap"])]
    lines.append(
      f"certificate of the robust gate, {units}: "
      + ", ".join(f"{k} {v[0]:.4f} {_bracket(v[1:])}" for k, v in values)
    )
  if "lambda_rank_correlation" in results:
    rho = results["lambda_rank_correlation"]
    lines.append(
      "rank correlation (Spearman) of λ̄ with the robust gate's L_k: "
      + ("undefined (a constant λ̄ or L)" if rho is None else f"{rho:+.3f}")
    )
  return "\n".join(lines)


def _padded(text: str, width: int) -> str:
  """`text` left-aligned in `width` columns; combining marks (the bar of λ̄) take none."""
  return text + " " * (width - sum(not unicodedata.combining(c) for c in text))


def _bracket(low_high) -> str:
  return f"[{low_high[0]:.4f}, {low_high[1]:.4f}]"


def plot(results: dict, lam_history: dict, workdir: str) -> list[str]:
  """PNG plots: λ over training, per-domain loss by method with intervals, gate usage."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  domains, paths = results["domains"], []

  fig, axes = plt.subplots(1, len(lam_history), figsize=(6 * len(lam_history), 3.5), squeeze=False)
  for ax, (name, lam_SxK) in zip(axes[0], lam_history.items()):
    for k, d in enumerate(domains):
      ax.plot(lam_SxK[:, k], label=d)
    ax.set(title=f"λ over training: {name}", xlabel="step", ylabel="λ_k")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "lambda.png"))
  files.write_figure(paths[-1], fig)
  plt.close(fig)

  # Experts alone are off the scale on other domains: they are in the table only.
  methods = [m for m in results["methods"] if not m.startswith("expert:")]
  groups = [*list(domains), "worst case"]
  fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(groups) + 4), 4))
  width = 0.8 / len(methods)
  for i, name in enumerate(methods):
    m, x = results["methods"][name], np.arange(len(groups)) + i * width
    vals = [m["domain_loss"][d] for d in domains] + [m["worst_case"]]
    ax.bar(x, vals, width, label=method_label(name))
    iv = m["intervals"]
    low, high = zip(*[iv["domain_loss"][d] for d in domains], iv["worst_case"])
    ax.vlines(x, low, high, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
  ax.axhline(0.0, color="k", lw=0.5)
  level = results["bootstrap"]["level"]
  ax.set(
    ylabel=f"L_k ({results['units']}, baseline {results['baseline']})",
    title=f"held-out loss per domain by method, with {100 * level:g}% intervals",
  )
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "domain_losses.png"))
  files.write_figure(paths[-1], fig)
  plt.close(fig)

  use = np.asarray(results["gate_usage"]["robust_gate"])
  fig, ax = plt.subplots(figsize=(4 + 0.4 * use.shape[1], 1 + 0.4 * use.shape[0]))
  im = ax.imshow(use, vmin=0, vmax=1, cmap="viridis")
  ax.set_yticks(range(len(domains)), domains)
  ax.set_xticks(range(use.shape[1]), results["experts"], rotation=45)
  ax.set(title="robust gate: mean weight per expert", ylabel="domain", xlabel="expert")
  fig.colorbar(im)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "gate_usage.png"))
  files.write_figure(paths[-1], fig)
  plt.close(fig)
  return paths
