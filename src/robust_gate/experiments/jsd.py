"""Monolithic model vs robust gate as the domains' Jensen-Shannon divergence
shrinks, on Markov domains small enough to enumerate every sequence (exact quantities).

For each similarity s (every chain's transition rows pulled toward shared rows) and
seed of `common.seeds` the main job runs under `<workdir>/s=<s>/seed=<seed>`; `point`
then scores every possible sequence, and each number is reported as mean ± sd over seeds.
"""

import copy
import itertools
import os

import numpy as np

from robust_gate import data as data_lib
from robust_gate import datasets, evaluate, experts, finite, objectives, pipeline, uncertainty
from robust_gate.experiments import common, reporting

SEEDS_NOTE = (
  "seeds vary each similarity's whole main job (experts, gates, monolithic models, student: "
  "initialization and minibatches); the domains and their samples are fixed by data.options"
)


def enumerate_markov(options: dict):
  """Every sequence of a small Markov config and log D_k of each, exactly.

  Returns (the dataset config, the sequences as tokens 1..S [N, T], log D_k [K, N]).
  """
  c = datasets.make_config("markov", **options)
  initial, trans = datasets.markov_chains(c)
  S, T = c.num_states, c.seq_len
  seqs = np.array(list(itertools.product(range(S), repeat=T)), np.int64)
  logd = np.log(initial)[:, seqs[:, 0]]
  for t in range(1, T):
    logd += np.log(trans)[:, seqs[:, t - 1], seqs[:, t]]
  return c, seqs + 1, logd


def mixture_logprobs(logd_KxN: np.ndarray, lam_K: np.ndarray) -> np.ndarray:
  """log D_λ = log Σ_k λ_k D_k, [N]."""
  return finite.logsumexp_np(np.log(lam_K)[:, None] + logd_KxN, 0)


def markov_jsd(logd_KxN: np.ndarray, lam_K: np.ndarray) -> float:
  """JSD_λ of the domains in nats per sequence, exactly: H(D_λ) − Σ_k λ_k H(D_k)."""
  mix_N = np.exp(mixture_logprobs(logd_KxN, lam_K))
  return float(finite.entropy_np(mix_N) - lam_K @ finite.entropy_np(np.exp(logd_KxN)))


def point(config, workdir: str, log=print) -> dict:
  """The exact quantities of docs/math.md §3 for a finished main job on Markov domains.

  Scores every possible sequence with the monolithic model and the robust gated
  model q: L_k = KL(D_k ‖ q) per token, JSD_λ̄, KL(D_λ̄ ‖ q), and the residual of
  Σ_k λ̄_k KL(D_k ‖ q) = KL(D_λ̄ ‖ q) + JSD_λ̄.
  """
  results, m = common.load(config, workdir)
  options = dict(config.data.options)
  c, seqs, logd_KxN = enumerate_markov(options)
  K, N = logd_KxN.shape
  T1 = c.seq_len + 1  # target tokens per sequence (with EOS)
  bits = lambda nats: objectives.nats_to_bits(nats / T1)  # nats per sequence → bits per token
  lam = np.array([results["lambda_bar"][d] for d in results["domains"]], np.float64)
  lam = lam / lam.sum()
  mix_N = np.exp(mixture_logprobs(logd_KxN, lam))
  d_KxN = np.exp(logd_KxN)
  jsd_lam = markov_jsd(logd_KxN, lam)
  data = data_lib.encode(
    list(seqs), np.zeros(N, np.int32), ["all"], m.splits.train.vocab_size, config.data.max_len
  )
  cache = experts.build_cache([m.experts.group], data)
  mono, gate = m.monoliths.monolithic, m.gates.robust_gate
  logq = {
    "monolithic": evaluate.lm_logprobs(mono.lm_cfg, mono.params, data).sum(1),
    "robust_gate": evaluate.gate_logprobs_and_usage(gate.cfg, gate.params, data, cache)[0].sum(1),
  }
  row = {
    "similarity": options.get("similarity", 0.0),
    "lambda_bar": lam.tolist(),
    "jsd_lambda_bar_bits_per_token": bits(jsd_lam),
    "jsd_uniform_bits_per_token": bits(markov_jsd(logd_KxN, np.full(K, 1 / K))),
    "models": {},
  }
  for name, lq in logq.items():
    logq_N = np.asarray(lq, np.float64)
    q_N = np.exp(logq_N)
    kl_k = uncertainty.kl_np(d_KxN, q_N)  # nats per sequence
    kl_mix = float(uncertainty.kl_np(mix_N, q_N))
    row["models"][name] = {
      "exact_L_bits_per_token": bits(kl_k).tolist(),
      "exact_worst": float(bits(kl_k.max())),
      "linearized_at_lambda_bar": float(bits(lam @ kl_k)),
      "mixture_kl_at_lambda_bar": bits(kl_mix),
      "identity_residual_nats": float(lam @ kl_k - kl_mix - jsd_lam),
      "test_worst": results["methods"][name]["worst_case"],
      "mass_on_length_T": float(np.exp(finite.logsumexp_np(logq_N, 0))),
    }
  g, mo = row["models"]["robust_gate"], row["models"]["monolithic"]
  row["monolithic_minus_robust_worst"] = mo["exact_worst"] - g["exact_worst"]
  log(
    f"jsd s={row['similarity']}: JSD_λ̄ {row['jsd_lambda_bar_bits_per_token']:.4f} "
    f"bits/token; exact worst mono {mo['exact_worst']:.4f} gate {g['exact_worst']:.4f} "
    f"(gap {row['monolithic_minus_robust_worst']:+.4f}); KL(D_λ̄‖q) mono "
    f"{mo['mixture_kl_at_lambda_bar']:.4f} gate {g['mixture_kl_at_lambda_bar']:.4f}; "
    f"identity residual "
    f"{max(abs(mo['identity_residual_nats']), abs(g['identity_residual_nats'])):.1e} nats"
  )
  return row


def run(config, workdir: str, log=print, similarities=(0.0, 0.5, 0.8, 0.95, 1.0)) -> dict:
  """The main job and `point` at each similarity s and seed, under `<workdir>/s=<s>/seed=<seed>`."""
  out: dict = {
    **common.seeded(config, SEEDS_NOTE),
    "similarities": list(similarities),
    "runs": [],
  }
  # The provenance of what `point` read in every sub-workdir, as "s=<s>/seed=<seed>/<input>".
  read: dict[str, list[dict] | None] = {}
  for s in similarities:
    points = []
    for seed in out["seeds"]:
      cfg = copy.deepcopy(config)
      with cfg.unlocked():
        cfg.data.options.similarity = float(s)
        cfg.seed = seed
      name = f"s={s}/seed={seed}"
      sub = os.path.join(workdir, name)
      log(f"jsd: main job with similarity {s}, seed {seed} in {sub}")
      pipeline.run(cfg, sub, log=lambda line: None)
      points.append(point(cfg, sub, log))
      read |= {f"{name}/{k}": v for k, v in reporting.inputs(sub).items()}
    per_seed = [{k: v for k, v in p.items() if k != "similarity"} for p in points]
    out["runs"].append({"similarity": float(s), **common.across_seeds(per_seed)})
  fig, axes = reporting.plt().subplots(1, 2, figsize=(11, 4))
  x = [r["jsd_lambda_bar_bits_per_token"]["mean"] for r in out["runs"]]
  model = lambda name, key: [r["models"][name][key] for r in out["runs"]]
  for name in ("monolithic", "robust_gate"):
    for key, fmt, label in (
      ("exact_worst", "o-", f"{name}: worst-case L_k"),
      ("mixture_kl_at_lambda_bar", "s--", f"{name}: KL(D_λ̄ ‖ q)"),
    ):
      axes[0].errorbar(
        x,
        [v["mean"] for v in model(name, key)],
        yerr=[v["sd"] for v in model(name, key)],
        fmt=fmt,
        capsize=3,
        label=label,
      )
  axes[0].plot(x, x, "k:", label="JSD_λ̄ (the identity's floor for Σλ̄L)")
  axes[0].set(
    xlabel="JSD_λ̄ of the domains (bits/token, seed mean)",
    ylabel="bits/token",
    title=f"exact losses vs domain divergence (mean ± sd over {len(out['seeds'])} seeds)",
  )
  axes[0].legend(fontsize=7)
  axes[1].errorbar(
    x,
    [r["monolithic_minus_robust_worst"]["mean"] for r in out["runs"]],
    yerr=[r["monolithic_minus_robust_worst"]["sd"] for r in out["runs"]],
    fmt="o-",
    capsize=3,
  )
  axes[1].axhline(0, color="k", lw=0.5)
  axes[1].set(
    xlabel="JSD_λ̄ (bits/token)",
    ylabel="monolithic − robust gate (bits/token)",
    title="worst-case gap",
  )
  return reporting.write(config, workdir, "jsd", out, fig, read=read)
