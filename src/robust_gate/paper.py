"""The paper's claims as experiments on a finished main job (issue 8).

Each experiment is `fn(config, workdir, log) -> dict`: it reads the models and
caches that `launch/main.py` left in `workdir` (except `jsd`, which runs its own
main jobs under `workdir`), writes `<workdir>/paper/<name>.json` and a PNG, and
prints a table. Every loss is that of a normalized model: gates are the causal
gates of docs/math.md §2.1 (in G_1 by construction), evaluated on the test split.

  mixtures    the loss of every method over a grid of test mixtures on the simplex
  conflict    per-domain gradient cosines over training: monolithic model vs gate
  jsd         synthetic domains of controlled Jensen-Shannon divergence (exact)
  gate_size   robust gates of increasing width on increasing data: held-out vs train
  prior       box and KL-ball Λ against the simplex: worst case inside and outside Λ
  extend      a new domain's expert added to a fitted gate: warm start vs scratch
  prune       experts with little gate mass under λ̄ dropped: worst case and cost
  ema         the reported gate as an EMA of w, several decays, against the last iterate
"""

import copy
import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_gate import data as data_lib
from robust_gate import datasets, evaluate, experts, files, models, parallel, pipeline
from robust_gate import train as train_lib
from robust_gate import uncertainty as uncertainty_lib
from robust_gate.checks import InputError

LN2 = float(np.log(2.0))


# ----------------------------------------------------------------------------- helpers


def _out(workdir, name, result, fig=None):
  out = os.path.join(workdir, "paper")
  if parallel.is_main():
    os.makedirs(out, exist_ok=True)
    files.write_json(os.path.join(out, f"{name}.json"), result)
    if fig is not None:
      fig.tight_layout()
      fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)
  return result


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def gate_config(config, num_experts: int, vocab_size: int, hidden=None):
  gc = config.gate
  return models.GateConfig(
    num_experts=num_experts,
    vocab_size=vocab_size,
    max_len=config.data.max_len,
    hidden=hidden or gc.hidden,
    token_embed=gc.token_embed,
    pos_embed=gc.pos_embed,
  )


def fit_gate(
  config,
  split,
  cache,
  baseline_K,
  *,
  log,
  name,
  evals,
  hidden=None,
  lam_set=None,
  steps=None,
  params=None,
  points: int = 10,
  ema_decay=None,
):
  """A robust gate over `cache`'s experts trained on `split` (the config's gate section).

  The gate evaluated is the EMA of w (`ema_decay`, default config.gate.ema_decay; 0:
  the last iterate, which oscillates: BUILD_NOTES, issue 8), at `points` evenly
  spaced steps (and at step 0) on every `evals[name] = (split, cache, baseline_K)`;
  `late` summarizes the second half.

  Returns (gate_cfg, state, curve): curve[i] = {"step": s, name: L_k (bits/token)}.
  """
  K, gc = split.num_domains, config.gate
  cfg = gate_config(config, cache.shape[-1], split.vocab_size, hidden)
  loss_fn = train_lib.gate_loss_fn(
    cfg, split, cache, gc.per_domain, jnp.asarray(baseline_K, jnp.float32)
  )
  if params is None:
    params = models.init_gate(cfg, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  step, state = train_lib.make_game(
    loss_fn,
    params,
    num_domains=K,
    lr=gc.lr,
    dual_lr=gc.dual_lr,
    seed=config.seed,
    uncertainty=lam_set or uncertainty_lib.simplex(K),
    ema_decay=gc.ema_decay if ema_decay is None else ema_decay,
  )
  steps = steps or gc.steps

  def point(p):
    return {
      "step": int(state.step),
      **{n: gate_losses(cfg, p, *e).tolist() for n, e in evals.items()},
    }

  curve = [point(state.ema_params)]
  for s in np.linspace(0, steps, points + 1).astype(int)[1:]:
    state, _ = train_lib.fit(
      step, state, int(s), name=name, log=lambda line: None, chunk=config.checkpoint_every
    )
    curve.append(point(state.ema_params))
  log(
    f"{name}: {steps} steps; "
    + ", ".join(
      f"{n} worst final {max(curve[-1][n]):.4f}, late {late(curve, n)[0]:.4f}" for n in evals
    )
  )
  return cfg, state, curve


def late(curve, name, worst=max):
  """(mean, std) of worst(L) over the evaluations in the second half of training:
  the held-out worst case of the gate stopped at a random late step."""
  last = curve[-1]["step"]
  vals = [float(worst(np.asarray(c[name]))) for c in curve if c["step"] > last / 2]
  return float(np.mean(vals)), float(np.std(vals))


def gate_losses(cfg, params, split, cache, baseline_K) -> np.ndarray:
  """The gated model's per-domain L_k on `split`, bits per token."""
  logp, _ = evaluate.gate_logprobs_and_usage(cfg, params, split, cache)
  return (evaluate.domain_ce(logp, split) - np.asarray(baseline_K)) / LN2


def _table(rows, cols, fmt="{:10.4f}"):
  head = f"{'':24s}" + "".join(f"{c[:12]:>13s}" for c in cols)
  lines = [head]
  for name, vals in rows:
    lines.append(
      f"{name[:24]:24s}"
      + "".join(f"{fmt.format(v):>13s}" if isinstance(v, float) else f"{v!s:>13s}" for v in vals)
    )
  return "\n".join(lines)


def _results(workdir) -> dict:
  """The finished main job's results.json (a clear error when there is none)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise InputError(
      f"{workdir} has no results.json: run launch/main.py "
      f"--workdir={workdir} with this config first."
    )
  with open(path) as f:
    return json.load(f)


def _load(config, workdir, log):
  del log  # restoring is quiet: the experiments print their own lines
  return _results(workdir), pipeline.load_models(config, workdir, log=lambda s: None)


def simplex_grid(K: int, n: int) -> np.ndarray:
  """Every λ on the simplex with coordinates in {0, 1/n, ..., 1}, [G, K]."""
  pts = [c for c in itertools.product(range(n + 1), repeat=K - 1) if sum(c) <= n]
  return np.array([[*list(c), n - sum(c)] for c in pts], np.float64) / n


# ----------------------------------------------------------------------- 1. mixtures


def mixtures(config, workdir, log=print, resolution: int = 4):
  """Item 1: L(λ) = Σ_k λ_k L_k of every method on a simplex grid and at λ̄."""
  results = _results(workdir)
  domains = results["domains"]
  K = len(domains)
  grid = simplex_grid(K, resolution)
  lam_bar = np.array([results["lambda_bar"][d] for d in domains])
  methods = {
    m: np.array([v["domain_loss"][d] for d in domains])
    for m, v in results["methods"].items()
    if not m.startswith("expert:")
  }
  robust = grid @ methods["robust_gate"]
  out = {
    "domains": domains,
    "grid_points": len(grid),
    "resolution": resolution,
    "units": results["units"],
    "methods": {},
  }
  for name, L in methods.items():
    mix = grid @ L
    out["methods"][name] = {
      "grid_worst": float(mix.max()),
      "grid_mean": float(mix.mean()),
      "at_lambda_bar": float(lam_bar @ L),
      "simplex_worst": float(L.max()),
      "gap_to_robust_worst": float(mix.max() - robust.max()),
      "robust_better_fraction": float(np.mean(robust <= mix + 1e-9)),
    }
  rows = [
    (
      n,
      [
        m["grid_worst"],
        m["grid_mean"],
        m["at_lambda_bar"],
        m["gap_to_robust_worst"],
        m["robust_better_fraction"],
      ],
    )
    for n, m in out["methods"].items()
  ]
  log(
    f"mixtures ({len(grid)} grid points, bits/token):\n"
    + _table(rows, ["grid worst", "grid mean", "at λ̄", "gap vs robust", "robust ≤ it"])
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  order = np.argsort(robust)
  for name, L in methods.items():
    ax.plot((grid @ L)[order], label=name, lw=2 if name == "robust_gate" else 1)
  ax.set(
    xlabel="test mixture (grid points, sorted by the robust gate's loss)",
    ylabel=f"Σ λ_k L_k ({results['units']})",
    title=f"loss over {len(grid)} test mixtures: {config.data.name}",
  )
  ax.legend(fontsize=7)
  return _out(workdir, "mixtures", out, fig)


# ----------------------------------------------------------------------- 2. conflict


def _mean_off_diagonal(c_KxK):
  K = c_KxK.shape[0]
  return float((c_KxK.sum() - np.trace(c_KxK)) / (K * (K - 1)))


def conflict(config, workdir, log=print, points: int = 6):
  """Item 2: per-domain gradient cosine matrices over training, monolithic vs gate."""
  _, m = _load(config, workdir, log)
  tr = m.splits.train
  K = tr.num_domains
  key = jax.random.PRNGKey(config.seed + 17)
  mono_cfg = m.monoliths.monolithic.lm_cfg
  mono_loss = m.monoliths.monolithic.loss_fn
  gate_cfg = m.gates.robust_gate.cfg
  runs = {
    "monolithic": (
      mono_loss,
      models.init_lm(mono_cfg, jax.random.PRNGKey(config.seed)),
      config.monolithic.lr,
      0.0,
      config.monolithic.steps,
    ),
    "gate": (
      m.gates.robust_gate.loss_fn,
      models.init_gate(gate_cfg, jax.random.PRNGKey(config.seed)),
      config.gate.lr,
      config.gate.dual_lr,
      config.gate.steps,
    ),
  }
  out: dict[str, Any] = {"domains": list(tr.domains), "models": {}}
  for name, (loss_fn, params, lr, dual_lr, steps) in runs.items():
    step, state = train_lib.make_game(
      loss_fn, params, num_domains=K, lr=lr, dual_lr=dual_lr, seed=config.seed
    )
    at = np.unique(np.linspace(0, steps, points).astype(int))
    mats = []
    for s in at:
      if s > int(state.step):
        state, _ = train_lib.fit(
          step, state, int(s), name=name, log=lambda s: None, chunk=config.checkpoint_every
        )
      mats.append(evaluate.gradient_conflict(loss_fn, state.params, key))
    mean = [_mean_off_diagonal(c) for c in mats]
    neg = [float(np.mean(c[~np.eye(K, dtype=bool)] < 0)) for c in mats]
    out["models"][name] = {
      "steps": at.tolist(),
      "mean_off_diagonal": mean,
      "negative_fraction": neg,
      "matrices": [c.tolist() for c in mats],
    }
    log(
      f"conflict {name}: mean off-diagonal cosine over steps "
      + " ".join(f"{s}:{v:+.3f}" for s, v in zip(at, mean))
      + f"; negative pairs at the end {neg[-1]:.0%}"
    )
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for name, r in out["models"].items():
    x = np.asarray(r["steps"]) / max(r["steps"][-1], 1)
    axes[0].plot(x, r["mean_off_diagonal"], marker="o", label=name)
  axes[0].axhline(0, color="k", lw=0.5)
  axes[0].set(
    xlabel="fraction of training",
    ylabel="mean cos(∇L_j, ∇L_k), j≠k",
    title="gradient conflict over training",
  )
  axes[0].legend()
  for ax, (name, r) in zip(axes[1:], out["models"].items()):
    im = ax.imshow(np.asarray(r["matrices"][-1]), vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(K), tr.domains, rotation=45)
    ax.set_yticks(range(K), tr.domains)
    ax.set(title=f"{name}: cosines at the end")
  fig.colorbar(im, ax=axes[-1], fraction=0.046)
  return _out(workdir, "conflict", out, fig)


# ---------------------------------------------------------------------------- 3. jsd


def _enumerate_markov(options: dict):
  """Every sequence of a small Markov config and log D_k of each, exactly."""
  c = datasets.make_config("markov", **options)
  initial, trans = datasets.markov_chains(c)
  S, T = c.num_states, c.seq_len
  seqs = np.array(list(itertools.product(range(S), repeat=T)), np.int64)
  logd = np.log(initial)[:, seqs[:, 0]]
  for t in range(1, T):
    logd += np.log(trans)[:, seqs[:, t - 1], seqs[:, t]]
  return c, seqs + 1, logd  # tokens 1..S; [K, N] log-probabilities


def _logsumexp(a, axis):
  m = a.max(axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.exp(a - m).sum(axis=axis))


def markov_jsd(logd_KxN, lam_K) -> float:
  """JSD_λ of the domains in nats per sequence, exactly: H(D_λ) − Σ_k λ_k H(D_k)."""
  logmix = _logsumexp(np.log(lam_K)[:, None] + logd_KxN, 0)
  H_k = -(np.exp(logd_KxN) * logd_KxN).sum(1)
  return float(-(np.exp(logmix) * logmix).sum() - lam_K @ H_k)


def jsd_point(config, workdir, log=print) -> dict:
  """The exact quantities of docs/math.md §3 for a finished main job on Markov domains.

  Scores every possible sequence with the monolithic model and the robust gated
  model q: L_k = KL(D_k ‖ q) per token, JSD_λ̄, KL(D_λ̄ ‖ q), and the residual of
  Σ_k λ̄_k KL(D_k ‖ q) = KL(D_λ̄ ‖ q) + JSD_λ̄.
  """
  results, m = _load(config, workdir, log)
  options = dict(config.data.options)
  c, seqs, logd_KxN = _enumerate_markov(options)
  K, N = logd_KxN.shape
  T1 = c.seq_len + 1  # target tokens per sequence (with EOS)
  lam = np.array([results["lambda_bar"][d] for d in results["domains"]], np.float64)
  lam = lam / lam.sum()
  logmix = _logsumexp(np.log(lam)[:, None] + logd_KxN, 0)
  jsd_lam = markov_jsd(logd_KxN, lam)
  tr = m.splits.train
  data = data_lib.encode(
    list(seqs), np.zeros(N, np.int32), ["all"], tr.vocab_size, config.data.max_len
  )
  group = m.experts.group
  cache = experts.build_cache([group], data)
  mono_cfg, mono_params = m.monoliths.monolithic.lm_cfg, m.monoliths.monolithic.params
  logq = {
    "monolithic": evaluate.lm_logprobs(mono_cfg, mono_params, data).sum(1),
    "robust_gate": evaluate.gate_logprobs_and_usage(
      m.gates.robust_gate.cfg, m.gates.robust_gate.params, data, cache
    )[0].sum(1),
  }
  row = {
    "similarity": options.get("similarity", 0.0),
    "lambda_bar": lam.tolist(),
    "jsd_lambda_bar_bits_per_token": jsd_lam / T1 / LN2,
    "jsd_uniform_bits_per_token": markov_jsd(logd_KxN, np.full(K, 1 / K)) / T1 / LN2,
    "models": {},
  }
  for name, lq in logq.items():
    lq = np.asarray(lq, np.float64)
    kl_k = (np.exp(logd_KxN) * (logd_KxN - lq[None])).sum(1)  # nats per sequence
    kl_mix = float((np.exp(logmix) * (logmix - lq)).sum())
    row["models"][name] = {
      "exact_L_bits_per_token": (kl_k / T1 / LN2).tolist(),
      "exact_worst": float(kl_k.max() / T1 / LN2),
      "linearized_at_lambda_bar": float(lam @ kl_k / T1 / LN2),
      "mixture_kl_at_lambda_bar": kl_mix / T1 / LN2,
      "identity_residual_nats": float(lam @ kl_k - kl_mix - jsd_lam),
      "test_worst": results["methods"][name]["worst_case"],
      "mass_on_length_T": float(np.exp(_logsumexp(lq, 0))),
    }
  g, mo = row["models"]["robust_gate"], row["models"]["monolithic"]
  log(
    f"jsd s={row['similarity']}: JSD_λ̄ {row['jsd_lambda_bar_bits_per_token']:.4f} "
    f"bits/token; exact worst mono {mo['exact_worst']:.4f} gate {g['exact_worst']:.4f} "
    f"(gap {mo['exact_worst'] - g['exact_worst']:+.4f}); KL(D_λ̄‖q) mono "
    f"{mo['mixture_kl_at_lambda_bar']:.4f} gate {g['mixture_kl_at_lambda_bar']:.4f}; "
    f"identity residual "
    f"{max(abs(mo['identity_residual_nats']), abs(g['identity_residual_nats'])):.1e} nats"
  )
  return row


def jsd(config, workdir, log=print, similarities=(0.0, 0.5, 0.8, 0.95, 1.0)):
  """Item 3: monolithic vs robust gate as the domains' JSD shrinks (exact quantities).

  For each similarity s (every chain's transition rows pulled toward shared rows),
  runs the main job under workdir/s=<s>, then `jsd_point` on it.
  """
  out = {"similarities": list(similarities), "runs": []}
  for s in similarities:
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.data.options.similarity = float(s)
    sub = os.path.join(workdir, f"s={s}")
    log(f"jsd: main job with similarity {s} in {sub}")
    pipeline.run(cfg, sub, log=lambda line: None)
    out["runs"].append(jsd_point(cfg, sub, log))
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  x = [r["jsd_lambda_bar_bits_per_token"] for r in out["runs"]]
  for name in ("monolithic", "robust_gate"):
    axes[0].plot(
      x,
      [r["models"][name]["exact_worst"] for r in out["runs"]],
      "o-",
      label=f"{name}: worst-case L_k",
    )
    axes[0].plot(
      x,
      [r["models"][name]["mixture_kl_at_lambda_bar"] for r in out["runs"]],
      "s--",
      label=f"{name}: KL(D_λ̄ ‖ q)",
    )
  axes[0].plot(x, x, "k:", label="JSD_λ̄ (the identity's floor for Σλ̄L)")
  axes[0].set(
    xlabel="JSD_λ̄ of the domains (bits/token)",
    ylabel="bits/token",
    title="exact losses vs domain divergence",
  )
  axes[0].legend(fontsize=7)
  axes[1].plot(
    x,
    [
      r["models"]["monolithic"]["exact_worst"] - r["models"]["robust_gate"]["exact_worst"]
      for r in out["runs"]
    ],
    "o-",
  )
  axes[1].axhline(0, color="k", lw=0.5)
  axes[1].set(
    xlabel="JSD_λ̄ (bits/token)",
    ylabel="monolithic − robust gate (bits/token)",
    title="worst-case gap",
  )
  return _out(workdir, "jsd", out, fig)


# ---------------------------------------------------------------------- 4. gate_size


def gate_size(config, workdir, log=print, hiddens=(4, 32, 256), fractions=(0.1, 0.3, 1.0)):
  """Item 4: robust gates of increasing width on increasing data."""
  _, m = _load(config, workdir, log)
  va, te = m.splits.validation, m.splits.test
  cache_va, cache_te = m.caches.validation.cache_NxTxM, m.caches.test.cache_NxTxM
  b_va, b_te = m.caches.validation.baseline_K, m.caches.test.baseline_K
  rng = np.random.default_rng(config.seed)
  out = {"hiddens": list(hiddens), "fractions": list(fractions), "runs": []}
  for frac in fractions:
    keep = np.concatenate(
      [
        rng.permutation(np.flatnonzero(va.domain_N == k))[
          : max(config.gate.per_domain, int(frac * np.sum(va.domain_N == k)))
        ]
        for k in range(va.num_domains)
      ]
    )
    sub = va.subset(keep)
    for h in hiddens:
      _, state, curve = fit_gate(
        config,
        sub,
        cache_va[keep],
        b_va,
        log=log,
        name=f"gate h={h} data={frac}",
        hidden=h,
        evals={"train": (sub, cache_va[keep], b_va), "test": (te, cache_te, b_te)},
      )
      (train, _), (test, test_sd) = late(curve, "train"), late(curve, "test")
      out["runs"].append(
        {
          "hidden": h,
          "fraction": frac,
          "examples": len(keep),
          "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
          "train_worst": train,
          "test_worst": test,
          "test_worst_sd": test_sd,
          "test_worst_final": float(max(curve[-1]["test"])),
          "curve": curve,
        }
      )
  rows = [
    (
      f"h={r['hidden']} data={r['fraction']}",
      [
        r["params"],
        r["examples"],
        r["train_worst"],
        r["test_worst"],
        r["test_worst"] - r["train_worst"],
      ],
    )
    for r in out["runs"]
  ]
  log(
    "gate_size (worst case, bits/token, mean over the second half of training):\n"
    + _table(rows, ["params", "examples", "train worst", "test worst", "test − train"])
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for frac in fractions:
    rs = [r for r in out["runs"] if r["fraction"] == frac]
    ax.plot(
      [r["params"] for r in rs],
      [r["test_worst"] for r in rs],
      "o-",
      label=f"held-out, {rs[0]['examples']} seqs",
    )
    ax.plot(
      [r["params"] for r in rs],
      [r["train_worst"] for r in rs],
      "x--",
      color=ax.lines[-1].get_color(),
      label=f"train, {rs[0]['examples']} seqs",
    )
  ax.set(
    xscale="log",
    xlabel="gate parameters",
    ylabel="worst-case L_k (bits/token)",
    title="gate size vs data",
  )
  ax.legend(fontsize=7)
  return _out(workdir, "gate_size", out, fig)


# -------------------------------------------------------------------------- 5. prior


def prior(config, workdir, log=print, box_scale=(0.6, 1.5), kl_radius=0.02):
  """Item 5: box and KL-ball Λ against the simplex, worst case inside and outside Λ.

  The sets are narrower than the config's defaults (which barely constrain K = 6
  domains): the box [0.6/K, 1.5/K] per domain, the KL ball of radius 0.02 around
  the uniform mixture. (They are arguments, not config fields, because the config's
  Λ is part of the finished robust gate's spec.)
  """
  _, m = _load(config, workdir, log)
  va, te = m.splits.validation, m.splits.test
  K = va.num_domains
  lo, hi = box_scale[0] / K, box_scale[1] / K
  sets = {
    "simplex": uncertainty_lib.simplex(K),
    "box": uncertainty_lib.box(np.full(K, lo), np.full(K, hi)),
    "kl_ball": uncertainty_lib.kl_ball(np.full(K, 1.0 / K), kl_radius),
  }
  out = {"box": [lo, hi], "kl_radius": kl_radius, "trained_on": {}}
  evals = {"test": (te, m.caches.test.cache_NxTxM, m.caches.test.baseline_K)}
  for name, lam_set in sets.items():
    _, _, curve = fit_gate(
      config,
      va,
      m.caches.validation.cache_NxTxM,
      m.caches.validation.baseline_K,
      log=log,
      name=f"gate Λ={name}",
      lam_set=lam_set,
      evals=evals,
    )
    worst_in = lambda S: lambda L: S.max_linear(jnp.asarray(L, jnp.float32))[0]
    out["trained_on"][name] = {
      "domain_loss_final": curve[-1]["test"],
      **{f"worst_in_{s}": late(curve, "test", worst_in(sets[s]))[0] for s in sets},
      **{f"worst_in_{s}_sd": late(curve, "test", worst_in(sets[s]))[1] for s in sets},
    }
  rows = [(f"Λ = {n}", [r[f"worst_in_{s}"] for s in sets]) for n, r in out["trained_on"].items()]
  log(
    "prior (rows: Λ the gate was trained for; columns: worst case over; bits/token, "
    "mean over the second half of training):\n" + _table(rows, [f"worst in {s}" for s in sets])
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  w = 0.25
  for i, (n, r) in enumerate(out["trained_on"].items()):
    ax.bar(
      np.arange(len(sets)) + i * w,
      [r[f"worst_in_{s}"] for s in sets],
      w,
      label=f"trained for Λ={n}",
    )
  ax.set_xticks(np.arange(len(sets)) + w, [f"worst over {s}" for s in sets])
  ax.set(ylabel="bits/token", title="prior knowledge: Λ")
  ax.legend(fontsize=7)
  return _out(workdir, "prior", out, fig)


# ------------------------------------------------------------------------- 6. extend


def expand_gate(old_params, new_params):
  """Warm start: every old weight copied; weights the new expert adds start at 0."""

  def one(old, new):
    if old.shape == new.shape:
      return old
    return jnp.zeros_like(new).at[tuple(slice(0, s) for s in old.shape)].set(old)

  return jax.tree_util.tree_map(one, old_params, new_params)


def extend(config, workdir, log=print, new_domain: int = -1):
  """Item 6: a gate fitted on K−1 domains; the K-th domain and its expert are added."""
  _, m = _load(config, workdir, log)
  va, te = m.splits.validation, m.splits.test
  cache_va, cache_te = m.caches.validation.cache_NxTxM, m.caches.test.cache_NxTxM
  b_va, b_te = m.caches.validation.baseline_K, m.caches.test.baseline_K
  K = va.num_domains
  new = new_domain % K
  old = [k for k in range(K) if k != new]
  order = [*old, new]  # the new expert and domain last

  def split_of(d, domains):
    """The examples of `domains`, relabelled 0..len(domains)−1 in that order."""
    idx = np.flatnonzero(np.isin(d.domain_N, domains))
    label = np.full(K, -1, np.int32)
    label[domains] = np.arange(len(domains))
    return dataclasses.replace(
      d.subset(idx), domain_N=label[d.domain_N[idx]], domains=tuple(d.domains[k] for k in domains)
    ), idx

  va_old, i_va = split_of(va, old)
  te_old, i_te = split_of(te, old)
  va_all, _ = split_of(va, order)
  te_all, _ = split_of(te, order)
  c_va_all, c_te_all = cache_va[..., order], cache_te[..., order]
  b_va_all, b_te_all = np.asarray(b_va)[order], np.asarray(b_te)[order]
  evals_old = {"test": (te_old, cache_te[i_te][..., old], np.asarray(b_te)[old])}
  _, st_old, curve_old = fit_gate(
    config,
    va_old,
    cache_va[i_va][..., old],
    np.asarray(b_va)[old],
    log=log,
    name=f"gate on {K - 1} domains",
    evals=evals_old,
  )
  fresh = models.init_gate(
    gate_config(config, K, va.vocab_size), jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  )
  evals = {"test": (te_all, c_te_all, b_te_all)}
  runs = {}
  for name, init in (
    ("warm start", expand_gate(st_old.ema_params, fresh)),
    ("from scratch", fresh),
  ):
    _, _, curve = fit_gate(
      config,
      va_all,
      c_va_all,
      b_va_all,
      log=log,
      name=f"gate on {K} domains, {name}",
      params=init,
      evals=evals,
    )
    runs[name] = {
      "curve": [(c["step"], max(c["test"])) for c in curve],
      "late_worst": late(curve, "test"),
    }
  target = runs["from scratch"]["late_worst"][0]
  for r in runs.values():
    hit = [s for s, v in r["curve"] if v <= target]
    r["first_step_at_or_below_scratch_late_mean"] = hit[0] if hit else None
  out = {
    "new_domain": va.domains[new],
    "old_domains": [va.domains[k] for k in old],
    "gate_on_old_domains_late_worst": late(curve_old, "test"),
    "runs": runs,
  }
  rows = [
    (
      n,
      [
        r["curve"][0][1],
        r["curve"][1][1],
        r["late_worst"][0],
        str(r["first_step_at_or_below_scratch_late_mean"]),
      ],
    )
    for n, r in runs.items()
  ]
  log(
    f"extend (add {va.domains[new]}; worst-case bits/token on all {K} domains):\n"
    + _table(rows, ["at step 0", f"step {r['curve'][1][0]}", "late mean", "first ≤ scratch"])
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for n, r in runs.items():
    ax.plot(*zip(*r["curve"]), "o-", label=n)
  ax.set(
    xlabel="gate steps after adding the domain",
    ylabel="test worst-case L_k (bits/token)",
    title=f"adding {va.domains[new]}'s expert",
    yscale="log",
  )
  ax.legend()
  return _out(workdir, "extend", out, fig)


# -------------------------------------------------------------------------- 7. prune


def prune(config, workdir, log=print, threshold: float = 0.02):
  """Item 7: drop experts with gate mass < threshold under λ̄; refit the gate on the rest.

  The whole pruning path is measured (refit on all M, drop the least-used expert,
  refit, repeat), so the cost of pruning is visible where nothing falls under the
  threshold. Worst cases are means over the second half of each refit (`late`).
  """
  results, m = _load(config, workdir, log)
  va, te = m.splits.validation, m.splits.test
  domains = results["domains"]
  lam = np.array([results["lambda_bar"][d] for d in domains])
  usage = np.asarray(results["gate_usage"]["robust_gate"])  # [K domains, M experts]
  mass = lam @ usage
  M = len(mass)
  cache_va, cache_te = m.caches.validation.cache_NxTxM, m.caches.test.cache_NxTxM
  b_va, b_te = m.caches.validation.baseline_K, m.caches.test.baseline_K
  expert_flops = 2 * sum(x.size for x in jax.tree_util.tree_leaves(m.experts.params)) / M
  path, keep = [], list(range(M))
  while keep:
    _, _, curve = fit_gate(
      config,
      va,
      cache_va[..., keep],
      b_va,
      log=log,
      name=f"gate on {len(keep)} experts",
      evals={"test": (te, cache_te[..., keep], b_te)},
    )
    worst, worst_sd = late(curve, "test")
    path.append(
      {
        "experts": [domains[j] for j in keep],
        "test_worst": worst,
        "test_worst_sd": worst_sd,
        "expert_flops_per_token": expert_flops * len(keep),
      }
    )
    keep = [j for j in keep if j != min(keep, key=lambda j: mass[j])]
  below = [domains[j] for j in range(M) if mass[j] < threshold]
  out = {
    "threshold": threshold,
    "mass_under_lambda_bar": dict(zip(domains, mass.tolist())),
    "pruned_at_threshold": below,
    "path": path,
  }
  log(
    "prune: gate mass under λ̄ "
    + ", ".join(f"{d}={x:.3f}" for d, x in zip(domains, mass))
    + f"; below {threshold}: {below or 'none'}"
  )
  log(
    _table(
      [
        (
          f"{len(p['experts'])} experts",
          [p["test_worst"], p["expert_flops_per_token"] / path[0]["expert_flops_per_token"]],
        )
        for p in path
      ],
      ["test worst", "expert cost"],
    )
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([len(p["experts"]) for p in path], [p["test_worst"] for p in path], "o-")
  ax.set(
    xlabel="experts kept (least gate mass under λ̄ dropped first)",
    ylabel="test worst-case L_k (bits/token)",
    title="pruning",
    yscale="log",
  )
  return _out(workdir, "prune", out, fig)


# ---------------------------------------------------------------------------- 8. ema


def ema(
  config, workdir, log=print, decays=(0.0, 0.9, 0.99, 0.998), seeds=(0, 1, 2), points: int = 30
):
  """The gate reported as an EMA of w (docs/math.md §4) against the last iterate (decay 0).

  The EMA does not feed back into training, so for one seed every decay sees the
  same trajectory of w and λ: the runs differ only in which gate is read off. Each
  is evaluated on validation (its training data) and test at `points` steps; `late`
  gives the mean and spread of the test worst case over the second half (what the
  last iterate's oscillation makes noisy), and the spread of the final worst case
  over gate seeds (config.seed + s; the experts stay those of the main job) is the
  draw a single run reports.
  """
  _, m = _load(config, workdir, log)
  va, te = m.splits.validation, m.splits.test
  evals = {
    "validation": (va, m.caches.validation.cache_NxTxM, m.caches.validation.baseline_K),
    "test": (te, m.caches.test.cache_NxTxM, m.caches.test.baseline_K),
  }
  out = {
    "decays": list(decays),
    "seeds": list(seeds),
    "steps": config.gate.steps,
    "runs": [],
    "summary": [],
  }
  for s in seeds:
    cfg = copy.deepcopy(config)
    cfg.seed = config.seed + s
    for decay in decays:
      _, _, curve = fit_gate(
        cfg,
        va,
        m.caches.validation.cache_NxTxM,
        m.caches.validation.baseline_K,
        log=log,
        name=f"gate seed+{s} ema_decay={decay}",
        evals=evals,
        points=points,
        ema_decay=decay,
      )
      worst, worst_sd = late(curve, "test")
      out["runs"].append(
        {
          "seed": cfg.seed,
          "ema_decay": decay,
          "test_worst_late": worst,
          "test_worst_late_sd": worst_sd,
          "test_worst_final": float(max(curve[-1]["test"])),
          "validation_worst_final": float(max(curve[-1]["validation"])),
          "curve": [(c["step"], max(c["test"])) for c in curve],
          "validation_curve": [(c["step"], max(c["validation"])) for c in curve],
        }
      )
  for decay in decays:
    rs = [r for r in out["runs"] if r["ema_decay"] == decay]
    final = [r["test_worst_final"] for r in rs]
    out["summary"].append(
      {
        "ema_decay": decay,
        "test_worst_late": float(np.mean([r["test_worst_late"] for r in rs])),
        "test_worst_late_sd": float(np.mean([r["test_worst_late_sd"] for r in rs])),
        "test_worst_final": float(np.mean(final)),
        "test_worst_final_sd_over_seeds": float(np.std(final)),
        "validation_worst_final": float(np.mean([r["validation_worst_final"] for r in rs])),
      }
    )
  log(
    f"ema (test worst case, bits/token, {len(seeds)} gate seeds; late: over the second "
    "half of training):\n"
    + _table(
      [
        (
          f"decay {r['ema_decay']}",
          [
            r["test_worst_late"],
            r["test_worst_late_sd"],
            r["test_worst_final"],
            r["test_worst_final_sd_over_seeds"],
            r["validation_worst_final"],
          ],
        )
        for r in out["summary"]
      ],
      ["late mean", "late std", "final mean", "final std", "val final"],
    )
  )
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, decay in enumerate(decays):
    for r in (r for r in out["runs"] if r["ema_decay"] == decay):
      steps, worst = zip(*r["curve"][1:])
      first = r["seed"] == config.seed + seeds[0]
      ax.plot(
        steps,
        worst,
        ".-" if first else "-",
        color=f"C{i}",
        alpha=1 if first else 0.3,
        label=f"ema_decay={decay}" if first else None,
      )
      if first:
        steps, worst = zip(*r["validation_curve"][1:])
        ax.plot(steps, worst, ":", color=f"C{i}")
  ax.set(
    xlabel="gate step",
    ylabel="worst-case L_k (bits/token)",
    title="the reported gate: last iterate vs EMA of w\n"
    "test (faint: other seeds); dotted: validation (the gate's training data)",
  )
  ax.title.set_fontsize(10)
  ax.legend(fontsize=7)
  return _out(workdir, "ema", out, fig)


EXPERIMENTS: dict[str, Callable[..., dict]] = {
  "mixtures": mixtures,
  "conflict": conflict,
  "jsd": jsd,
  "gate_size": gate_size,
  "prior": prior,
  "extend": extend,
  "prune": prune,
  "ema": ema,
}
