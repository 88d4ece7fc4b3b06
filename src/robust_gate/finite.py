"""The robust gating game on a finite space, where every quantity is exact.

`solve` runs the primal-dual algorithm of docs/math.md §4 with a sequence-level
gate (§2.2) over N points: either a free table of scores s(x) ("tabular") or a
small network over the experts' log-probabilities at x ("mlp", which contains
the Bayes-posterior gate). `robust_gate.reference.solve_exact` solves the same
game by convex optimization, independently, for comparison.

Reported numbers are computed in float64 from the final gate, and the model is
normalized exactly (Z_w is a finite sum), so every loss is that of a real model.
"""

from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_gate import checks, dual, gating, objectives, primal_dual
from robust_gate import uncertainty as uncertainty_lib

GATES = ("tabular", "mlp")
# Adam step sizes that converge on the test instances (BUILD_NOTES.md); the
# network diverges at the table's 0.1.
_DEFAULT_PRIMAL_LR: dict[str, float] = {"tabular": 0.1, "mlp": 0.01}
# Expert log-probabilities are floored here when used as gate-network features.
_FEATURE_FLOOR = -30.0


class FiniteSolution(NamedTuple):
  """What `solve` returns; arrays are float64 numpy."""

  model_probs: np.ndarray  # [N] p_g, sums to 1.
  gate: np.ndarray  # [N, M] g(x, j) = softmax(s(x))_j / Z (in G_1).
  lam_avg: np.ndarray  # [K] λ̄, the average λ played.
  lam_last: np.ndarray  # [K] the last λ.
  domain_kl: np.ndarray  # [K] KL(D_k ‖ p_g).
  domain_loss: np.ndarray  # [K] L_k = CE(D_k, p_g) − b_k (the game's losses).
  worst_case: float  # max_{λ∈Λ} Σ_k λ_k L_k (linearized objective).
  lam_worst: np.ndarray  # [K] a maximizer of the above.
  mixture_worst_case: float  # max_{λ∈Λ} KL(D_λ ‖ p_g) (exact mixture objective).
  history: dict  # per-step metrics: "lam" [S, K], "losses" [S, K], ...


class _GateMLP(nn.Module):
  """Sequence-level gate scores s_w(x) from the experts' log-probs at x."""

  num_experts: int
  hidden: int

  @nn.compact
  def __call__(self, features_NxF):
    h = nn.gelu(nn.Dense(self.hidden)(features_NxF))
    linear = nn.Dense(self.num_experts, kernel_init=nn.initializers.zeros)(features_NxF)
    return linear + nn.Dense(self.num_experts, kernel_init=nn.initializers.zeros)(h)


def solve(
  domain_probs_KxN,
  expert_logprobs_MxN,
  *,
  uncertainty: uncertainty_lib.UncertaintySet | None = None,
  gate: str = "tabular",
  steps: int = 3000,
  seed: int = 0,
  primal_lr: float | None = None,
  dual_lr: float = 0.1,
  dual_smoothing: float = 0.0,
  ema_decay: float = 0.0,
  baseline: str = "entropy",
  hidden: int = 32,
  batch_size: int | None = None,
) -> FiniteSolution:
  """Runs the robust gating game on a finite space of N points.

  Args:
    domain_probs_KxN: D_k(x), each row a distribution.
    expert_logprobs_MxN: log p_j(x), each row normalized; -inf allowed.
    uncertainty: Λ; None means the whole simplex.
    gate: "tabular" (free scores per point) or "mlp" (a network over the
      experts' log-probabilities at x).
    steps: number of primal-dual steps (all in one lax.scan).
    seed: PRNG seed (network init, minibatch sampling).
    primal_lr: Adam learning rate of the gate; None: 0.1 tabular, 0.01 mlp.
    dual_lr: mirror-ascent step η; it decays as η/√(1 + t/100).
    dual_smoothing: ε, mixing toward Λ's prior after each dual step.
    ema_decay: EMA of the gate parameters; the EMA gate is reported when > 0.
    baseline: "entropy" (L_k is the exact KL), "expert" or "none" (§3).
    hidden: width of the "mlp" gate.
    batch_size: None for exact expectations, else B ≤ N samples per domain per
      step (the stochastic algorithm). Either way a step costs O(N·M): the
      normalizer Z_w and the gate's update span every point.

  Returns:
    A FiniteSolution.

  Raises:
    InputError: an argument outside its domain (checked before any work), or a
      game that diverged (NaN or inf in the final gate or λ).
  """
  probs = checks.check_probabilities(domain_probs_KxN)
  logp = checks.check_logprobs(expert_logprobs_MxN)
  checks.check_support(probs, logp)
  K, N = probs.shape
  if uncertainty is None:
    uncertainty = uncertainty_lib.simplex(K)
  if not isinstance(uncertainty, uncertainty_lib.UncertaintySet):
    raise checks.InputError(
      f"uncertainty={uncertainty!r} must be an UncertaintySet (uncertainty.simplex, box, "
      f"kl_ball) or None."
    )
  if uncertainty.num_domains != K:
    raise checks.InputError(
      f"uncertainty set is over {uncertainty.num_domains} domains but domain_probs has K={K}."
    )
  if gate not in GATES:
    raise checks.InputError(f"unknown gate {gate!r}; choose one of {GATES}.")
  if baseline not in objectives.BASELINES:
    raise checks.InputError(f"unknown baseline {baseline!r}; choose one of {objectives.BASELINES}.")
  if baseline == "expert" and logp.shape[0] < K:
    raise checks.InputError(
      f"baseline='expert' pairs domain k with expert k, but there are {logp.shape[0]} "
      f"experts for {K} domains."
    )
  steps = checks.check_int(steps, "steps")
  seed = checks.check_int(seed, "seed", 0, 2**32)  # PRNGKey keeps 32 bits of larger seeds
  hidden = checks.check_int(hidden, "hidden")
  if batch_size is not None:
    batch_size = checks.check_int(batch_size, "batch_size")
    if batch_size > N:
      raise checks.InputError(
        f"batch_size={batch_size} draws more points per step than the N={N} there are: "
        f"batch_size=None (the exact expectations) costs less and has no noise."
      )
  primal_lr = checks.check_real(
    _DEFAULT_PRIMAL_LR[gate] if primal_lr is None else primal_lr, "primal_lr", low_open=True
  )
  dual_lr = checks.check_real(dual_lr, "dual_lr")
  dual_smoothing = checks.check_real(dual_smoothing, "dual_smoothing", 0.0, 1.0)
  ema_decay = checks.check_real(ema_decay, "ema_decay", 0.0, 1.0)

  # Points no expert covers carry no domain mass (check_support) and get p = 0
  # under every gate; dropping them keeps every gradient finite.
  covered = logp.max(axis=0) > -np.inf
  probs_c = jnp.asarray(probs[:, covered], jnp.float32)
  logp_c = jnp.asarray(logp[:, covered], jnp.float32)
  cdf_KxNc = jnp.asarray(integer_cdf(probs[:, covered]))
  baseline_K = objectives.finite_baselines(
    baseline, jnp.asarray(probs, jnp.float32), jnp.asarray(logp, jnp.float32)
  )

  key_init, key_game = jax.random.split(jax.random.PRNGKey(seed))
  log_gate_fn, params = _make_gate(gate, logp_c, hidden, key_init)

  def loss_fn(params, batch, key):
    del batch
    logp_N = gating.finite_sequence_logp(log_gate_fn(params), logp_c)
    if batch_size is None:
      return objectives.cross_entropy(probs_c, logp_N) - baseline_K
    return -jnp.mean(logp_N[sample_points(key, cdf_KxNc, batch_size)], axis=1) - baseline_K

  primal_opt = optax.adam(primal_lr)
  dual_opt = dual.mirror_ascent(
    lambda t: dual_lr / jnp.sqrt(1.0 + t / 100.0), uncertainty, smoothing=dual_smoothing
  )
  step_fn = primal_dual.make_step(loss_fn, primal_opt, dual_opt, ema_decay=ema_decay)
  state = primal_dual.init_state(params, primal_opt, dual_opt, key_game)
  state, history = primal_dual.run(step_fn, state, steps)

  final_params = state.ema_params  # the last iterate when ema_decay = 0
  log_gate_NxM = np.asarray(log_gate_fn(final_params), np.float64)
  lam_avg, lam_last = np.asarray(state.lam_avg_K, np.float64), np.asarray(state.lam_K, np.float64)
  if not all(np.all(np.isfinite(a)) for a in (log_gate_NxM, lam_avg, lam_last)):
    raise checks.InputError(
      f"the game diverged: after {steps} steps the gate or λ holds NaN or inf; lower "
      f"primal_lr={primal_lr} or dual_lr={dual_lr}."
    )
  # The game runs in float32; the report recomputes b_k in float64, so that
  # quantities compared against float64 references (the exact mixture KL, the
  # exact minimax value) differ by the solution, not by float32 rounding of H(D_k).
  return _report(
    probs,
    logp,
    covered,
    log_gate_NxM,
    _baselines_np(baseline, probs, logp),
    uncertainty,
    lam_avg,
    lam_last,
    jax.tree_util.tree_map(np.asarray, history),
  )


def random_instance(
  seed: int,
  num_domains: int,
  num_points: int,
  num_experts: int | None = None,
  perturbed: bool = False,
  expert_noise: float = 0.3,
):
  """A random finite game: (domain_probs_KxN, expert_logprobs_MxN), float64.

  Domains are sparse Dirichlet(0.3) draws: masses below 1e-3, or below a tenth
  of the uniform mass 1/N when that is smaller, are set to zero. (A fixed 1e-3
  would zero every mass once N passes ~3000, since all are then below it; the
  largest mass is ≥ 1/N, so every domain keeps some.) Expert j is domain j mod K,
  exact, or when `perturbed` mixed with weight `expert_noise` with a random
  full-support distribution.
  """
  checks.check_int(seed, "seed", 0)
  checks.check_int(num_domains, "num_domains")
  checks.check_int(num_points, "num_points")
  M = num_domains if num_experts is None else checks.check_int(num_experts, "num_experts")
  checks.check_real(expert_noise, "expert_noise", 0.0, 1.0, high_open=False)
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.full(num_points, 0.3), size=num_domains)
  probs = np.where(probs > min(1e-3, 0.1 / num_points), probs, 0.0)
  probs /= probs.sum(axis=1, keepdims=True)
  experts = probs[np.arange(M) % num_domains]
  if perturbed:
    experts = (1 - expert_noise) * experts + expert_noise * rng.dirichlet(
      np.ones(num_points), size=M
    )
  with np.errstate(divide="ignore"):
    return probs, np.log(experts)


def _make_gate(gate, logp_MxN, hidden, key):
  """Returns (log_gate_fn(params) -> [N, M] log-softmax, initial params)."""
  M, N = logp_MxN.shape
  if gate == "tabular":
    return (lambda scores_NxM: jax.nn.log_softmax(scores_NxM, axis=-1), jnp.zeros((N, M)))
  features_NxM = jnp.maximum(logp_MxN.T, _FEATURE_FLOOR) / -_FEATURE_FLOOR
  model = _GateMLP(num_experts=M, hidden=hidden)
  params = model.init(key, features_NxM)
  return (
    lambda p: jax.nn.log_softmax(cast(jax.Array, model.apply(p, features_NxM)), axis=-1),
    params,
  )


def integer_cdf(probs_KxN: np.ndarray) -> np.ndarray:
  """Each row's cumulative weights round(p · 2^30), int32: `sample_points` draws
  from them exactly up to 2^-31 per point, far below float32's 2^-24 near 1."""
  return np.cumsum(np.round(probs_KxN * 2.0**30), axis=1).astype(np.int32)


def sample_points(key: jax.Array, cdf_KxN: jax.Array, per_domain: int) -> jax.Array:
  """`per_domain` points of every domain, [K, B], by binary search in `integer_cdf`.

  A draw costs O(K·B·log N); a Gumbel draw per point (`jax.random.categorical`)
  costs O(K·B·N), which at N = 10^5 and B = 64 made a minibatch step ~100× an
  exact one (launch/finite_sweep.py --mode=timing).
  """
  K = cdf_KxN.shape[0]
  r_KxB = jax.random.randint(key, (K, per_domain), 0, cdf_KxN[:, -1:])
  return jax.vmap(lambda cdf_N, r_B: jnp.searchsorted(cdf_N, r_B, side="right"))(cdf_KxN, r_KxB)


def _report(
  probs, logp, covered, log_gate_NcxM, baseline_K, uncertainty, lam_avg, lam_last, history
) -> FiniteSolution:
  """Evaluates the final gate exactly, in float64."""
  N = probs.shape[1]
  log_c = logsumexp_np(log_gate_NcxM + logp[:, covered].T, axis=1)
  log_z = logsumexp_np(log_c, axis=0)
  model_probs = np.zeros(N)
  model_probs[covered] = np.exp(log_c - log_z)
  gate_NxM = np.zeros((N, logp.shape[0]))
  gate_NxM[covered] = np.exp(log_gate_NcxM - log_z)
  domain_kl = uncertainty_lib.kl_np(probs, model_probs)
  domain_loss = domain_kl + entropy_np(probs) - np.asarray(baseline_K, np.float64)
  _worst_case, lam_worst = uncertainty.max_linear(jnp.asarray(domain_loss, jnp.float32))
  return FiniteSolution(
    model_probs=model_probs,
    gate=gate_NxM,
    lam_avg=lam_avg,
    lam_last=lam_last,
    domain_kl=domain_kl,
    domain_loss=domain_loss,
    worst_case=float(np.dot(np.asarray(lam_worst, np.float64), domain_loss)),
    lam_worst=np.asarray(lam_worst, np.float64),
    mixture_worst_case=max_mixture_kl(probs, model_probs, uncertainty),
    history=history,
  )


def _baselines_np(kind: str, probs_KxN: np.ndarray, logp_MxN: np.ndarray) -> np.ndarray:
  """`objectives.finite_baselines` in float64 numpy (kind already checked there)."""
  K = probs_KxN.shape[0]
  if kind == "entropy":
    return entropy_np(probs_KxN)
  if kind == "expert":
    pos = probs_KxN > 0
    return -np.sum(np.where(pos, probs_KxN * np.where(pos, logp_MxN[:K], 0.0), 0.0), axis=1)
  return np.zeros(K)


def logsumexp_np(a, axis):
  """log Σ exp(a) along `axis`, in numpy; -inf where every term is -inf."""
  m = np.max(a, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def entropy_np(probs_KxN: np.ndarray) -> np.ndarray:
  """H(D_k) in float64 numpy."""
  pos = probs_KxN > 0
  return -np.sum(np.where(pos, probs_KxN * np.log(np.where(pos, probs_KxN, 1)), 0), axis=-1)


def max_mixture_kl(
  probs_KxN: np.ndarray, q_N: np.ndarray, uncertainty: uncertainty_lib.UncertaintySet
) -> float:
  """max_{λ∈Λ} KL(D_λ ‖ q), the exact mixture objective's worst case (§3).

  KL(D_λ ‖ q) is convex in λ, so on a polytope (simplex, box) the maximum is at
  a vertex and this is exact. On a KL ball it is the best of projected
  mirror-ascent runs from several starts: a lower bound, tight in practice.
  """
  if uncertainty.kind != "kl_ball":
    return float(np.max(uncertainty_lib.kl_np(uncertainty.vertices() @ probs_KxN, q_N)))
  K = probs_KxN.shape[0]
  probs = jnp.asarray(probs_KxN, jnp.float32)
  logq = jnp.log(jnp.asarray(q_N, jnp.float32))

  def ascend(log_lam0_K):
    def body(_, log_lam_K):
      g_K = jax.grad(lambda lam: objectives.mixture_kl(lam, probs, logq))(jnp.exp(log_lam_K))
      return uncertainty.project_log(log_lam_K + 0.5 * g_K)

    log_lam_K = jax.lax.fori_loop(0, 500, body, log_lam0_K)
    return objectives.mixture_kl(jnp.exp(log_lam_K), probs, logq)

  starts_SxK = jnp.log(
    jnp.concatenate([uncertainty.prior_K[None], 0.5 * uncertainty.prior_K[None] + 0.5 * jnp.eye(K)])
  )
  return float(jnp.max(jax.jit(jax.vmap(ascend))(starts_SxK)))
