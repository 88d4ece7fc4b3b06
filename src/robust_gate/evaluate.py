"""Evaluation: per-domain held-out losses of every method, tables, plots (docs/math.md §6).

Losses are reported in bits per token. `domain_loss` is L_k = CE(D_k, model) − b_k
with the same baseline the game used (default: b_k = the domain's own expert's
held-out cross-entropy, so L_k is the excess over that expert); `domain_ce` is
the raw cross-entropy. The worst case is `max_{λ∈Λ} Σ_k λ_k L_k`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import experts, files, gating, models, objectives, parallel, records
from robust_gate.checks import InputError
from robust_gate.data import DomainData


def domain_mean(values_NxT, data: DomainData) -> np.ndarray:
  """Per-token values ([N, T] or [N, T, M]) averaged over each domain's tokens
  (Σ over the domain's tokens / their number): [K] or [K, M].

  Raises InputError naming a domain with no tokens, whose mean does not exist (a
  split or subset without its examples), rather than reporting NaN for it.
  """
  values = np.asarray(values_NxT)
  mask = data.mask_NxT.reshape(data.mask_NxT.shape + (1,) * (values.ndim - 2))
  per_seq = np.where(mask, values, 0.0).sum(axis=1)  # [N] or [N, M]
  K = data.num_domains
  if per_seq.ndim == 1:
    totals = np.bincount(data.domain_N, per_seq, K)
  else:
    cols = [np.bincount(data.domain_N, per_seq[:, j], K) for j in range(per_seq.shape[1])]
    totals = np.stack(cols, 1)
  tokens = np.bincount(data.domain_N, data.mask_NxT.sum(axis=1), K)
  for domain, n in zip(data.domains, tokens):
    if n == 0:
      raise InputError(f"domain {domain!r} has no tokens in this data: its mean is undefined.")
  return totals / tokens.reshape(tokens.shape + (1,) * (totals.ndim - 1))


def domain_ce(logp_NxT: np.ndarray, data: DomainData) -> np.ndarray:
  """Cross-entropy per domain, nats per token (Σ NLL / Σ tokens), [K]."""
  return domain_mean(-np.asarray(logp_NxT), data)


def excess_bits(ce_nats_K, baseline_nats_K) -> np.ndarray:
  """L_k = CE_k − b_k in bits per token, [K]."""
  return objectives.nats_to_bits(np.asarray(ce_nats_K) - np.asarray(baseline_nats_K))


def lm_logprobs(config: models.LMConfig, params, data: DomainData) -> np.ndarray:
  """One transformer's log-probs of the observed tokens, [N, T] (validated)."""
  model = experts.Expert(
    names=("model",),
    vocab_size=config.vocab_size,
    logprob_fn=lambda x, y: models.token_logprobs(config, params, x, y),
  )
  return experts.build_cache([model], data)[..., 0]


def gate_logprobs_and_usage(
  config: models.GateConfig, params, data: DomainData, cache_NxTxM
) -> tuple[np.ndarray, np.ndarray]:
  """The gated model's log-probs [N, T] and mean gate weights per domain [K, M]."""

  @jax.jit
  def fn(p, x, c, m):
    prefix = models.prefix_loglik(c, m)
    log_gate = models.gate_log_weights(config, p, x, prefix)
    return gating.causal_mixture_logp(log_gate, c), jnp.exp(log_gate)

  rows, n = parallel.put_rows(data.inputs_NxT, cache_NxTxM, data.mask_NxT)
  logp, gate = fn(params, *rows)
  return parallel.fetch(logp)[:n], usage(parallel.fetch(gate)[:n], data)


def fixed_gate_logprobs(log_gate_NxTxM, cache_NxTxM) -> np.ndarray:
  return np.asarray(jax.nn.logsumexp(log_gate_NxTxM + cache_NxTxM, axis=-1))


def usage(gate_NxTxM: np.ndarray, data: DomainData) -> np.ndarray:
  """Mean gate weight of each expert over each domain's tokens, [K, M]."""
  return domain_mean(gate_NxTxM, data)


def method_entry(ce_nats_K, baseline_nats_K, uncertainty, domains) -> dict:
  loss_K = excess_bits(ce_nats_K, baseline_nats_K)
  worst, _ = uncertainty.max_linear(jnp.asarray(loss_K, jnp.float32))
  return {
    "domain_loss": dict(zip(domains, map(float, loss_K))),
    "domain_ce": dict(zip(domains, map(float, objectives.nats_to_bits(np.asarray(ce_nats_K))))),
    "mean": float(loss_K.mean()),
    "worst_case": float(worst),
  }


def methods_on_test(m: records.TrainedModels, uncertainty) -> tuple[dict, dict]:
  """Every method of docs/math.md §6 on the test split.

  Returns ({method: `method_entry`}, {gate: `usage`, [K, M]}) for the two trained
  gates, the uniform mixture, the posterior gate, the monolithic models, the
  student and each expert alone.
  """
  te, cache, baseline_K = m.caches.test.data, m.caches.test.cache_NxTxM, m.caches.test.baseline_K
  K, domains = te.num_domains, te.domains
  entry = lambda logp: method_entry(domain_ce(logp, te), baseline_K, uncertainty, domains)
  methods, use = {}, {}
  for name, gate in m.gates.items():
    logp, use[name] = gate_logprobs_and_usage(gate.cfg, gate.params, te, cache)
    methods[name] = entry(logp)
  uniform = np.full(cache.shape, -np.log(K), np.float32)
  methods["uniform_mixture"] = entry(fixed_gate_logprobs(uniform, cache))
  prefix_NxTxM = models.prefix_loglik(jnp.asarray(cache), jnp.asarray(te.mask_NxT))
  posterior = np.asarray(gating.posterior_log_gate(jnp.zeros(K), prefix_NxTxM.reshape(-1, K)))
  posterior = posterior.reshape(cache.shape)
  methods["posterior_gate"] = entry(fixed_gate_logprobs(posterior, cache))
  use["posterior_gate"] = usage(np.exp(posterior), te)
  for name in ("monolithic", "monolithic_large", "monolithic_dro"):
    mono = getattr(m.monoliths, name)
    methods[name] = entry(lm_logprobs(mono.lm_cfg, mono.params, te))
  methods["student"] = entry(lm_logprobs(m.student.lm_cfg, m.student.params, te))
  for j, d in enumerate(domains):
    methods[f"expert:{d}"] = entry(cache[..., j])
  return methods, use


def gradient_conflict(loss_fn, params, key) -> np.ndarray:
  """Cosine matrix of the per-domain gradients ∇L_k at `params` on one batch, [K, K]."""
  jac = jax.jacrev(lambda p: loss_fn(p, None, key))(params)
  flat = np.concatenate(
    [np.asarray(g).reshape(np.asarray(g).shape[0], -1) for g in jax.tree_util.tree_leaves(jac)],
    axis=1,
  )
  flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
  return flat @ flat.T


def format_table(results: dict) -> str:
  domains = results["domains"]
  head = (
    f"{'method':22s}" + "".join(f"{d[:9]:>10s}" for d in domains) + f"{'mean':>10s}{'worst':>10s}"
  )
  lines = [
    f"per-domain loss L_k, {results['units']} (baseline: {results['baseline']})",
    head,
    "-" * len(head),
  ]
  for name, m in results["methods"].items():
    lines.append(
      f"{name:22s}"
      + "".join(f"{m['domain_loss'][d]:10.4f}" for d in domains)
      + f"{m['mean']:10.4f}{m['worst_case']:10.4f}"
    )
  lines.append(
    "λ̄ (robust gate): " + ", ".join(f"{d}={w:.3f}" for d, w in results["lambda_bar"].items())
  )
  return "\n".join(lines)


def plot(results: dict, lam_history: dict, workdir: str) -> list[str]:
  """PNG plots: λ over training, per-domain loss by method, gate usage."""
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
    m = results["methods"][name]
    vals = [m["domain_loss"][d] for d in domains] + [m["worst_case"]]
    ax.bar(np.arange(len(groups)) + i * width, vals, width, label=name)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set(
    ylabel=f"L_k ({results['units']}, baseline {results['baseline']})",
    title="held-out loss per domain by method",
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
