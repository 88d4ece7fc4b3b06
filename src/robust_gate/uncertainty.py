"""Uncertainty sets Λ ⊆ Δ_K over domain mixtures (docs/math.md §1, §3, §4).

Three sets, one pytree type:

  simplex(K)              the whole simplex Δ_K
  box(lo, hi)             {λ ∈ Δ_K : lo ≤ λ ≤ hi}
  kl_ball(prior, radius)  {λ ∈ Δ_K : KL(λ ‖ prior) ≤ radius}

Each offers the KL (Bregman) projection used by the entropic mirror-ascent dual
player, computed in log space, and the exact maximum of a linear function over Λ
(the certificate's upper value). Both are jit-compatible; the set's kind is static.
Constructors validate their arguments eagerly: a set that admits no mixture, or
arguments outside the simplex, raise `InputError`.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from robust_gate.checks import InputError

# Bisection iterations for the box and KL-ball projections; float32 converges
# well before this (each halves a bracket of width < 200).
_BISECTION_STEPS = 64
# Tolerance on "Σ lo ≤ 1 ≤ Σ hi" and on membership tests.
_FEASIBILITY_ATOL = 1e-6


@struct.dataclass
class UncertaintySet:
  """A closed convex set of mixtures; build it with simplex, box or kl_ball.

  Attributes:
    kind: "simplex", "box" or "kl_ball" (static).
    lo_K, hi_K: box bounds (0 and 1 for the other kinds).
    prior_K: a point of Λ: uniform for the simplex, the KL projection of the
      uniform mixture for a box, the ball's centre. Smoothing pulls toward it.
    radius: the KL ball's radius (inf for the other kinds).
  """

  lo_K: jax.Array
  hi_K: jax.Array
  prior_K: jax.Array
  radius: jax.Array
  kind: str = struct.field(pytree_node=False, default="simplex")

  @property
  def num_domains(self) -> int:
    return self.prior_K.shape[0]

  def project_log(self, log_q_K: jax.Array) -> jax.Array:
    """KL projection of the positive vector exp(log_q_K) onto Λ; returns log λ."""
    chex.assert_shape(log_q_K, (self.num_domains,))
    log_q_K = jax.nn.log_softmax(log_q_K)
    if self.kind == "simplex":
      return log_q_K
    if self.kind == "box":
      return _project_box_log(log_q_K, self.lo_K, self.hi_K)
    return _project_kl_ball_log(log_q_K, self.prior_K, self.radius)

  def max_linear(self, c_K: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact `max_{λ∈Λ} <λ, c>`; returns (value, a maximizing λ)."""
    chex.assert_shape(c_K, (self.num_domains,))
    if self.kind == "simplex":
      lam_K = jax.nn.one_hot(jnp.argmax(c_K), self.num_domains, dtype=c_K.dtype)
    elif self.kind == "box":
      lam_K = _max_linear_box(c_K, self.lo_K, self.hi_K)
    else:
      lam_K = _max_linear_kl_ball(c_K, self.prior_K, self.radius)
    return jnp.dot(lam_K, c_K), lam_K

  def contains(self, lam_K, atol: float = 1e-5) -> bool:
    """Whether `lam_K` lies in Λ up to `atol` (eager, on concrete values)."""
    lam = np.asarray(lam_K, np.float64)
    if lam.shape != (self.num_domains,) or not np.all(np.isfinite(lam)):
      return False
    ok = bool(np.all(lam >= -atol) and abs(lam.sum() - 1.0) <= atol)
    if self.kind == "box":
      ok &= bool(
        np.all(lam >= np.asarray(self.lo_K) - atol) and np.all(lam <= np.asarray(self.hi_K) + atol)
      )
    if self.kind == "kl_ball":
      kl = kl_np(np.clip(lam, 0, None), np.asarray(self.prior_K, np.float64))
      ok &= bool(kl <= float(self.radius) + atol)
    return ok

  def vertices(self) -> np.ndarray:
    """The extreme points of a polytope Λ (simplex or box), as rows.

    A convex function's maximum over Λ is attained at one of them. Raises for
    the KL ball, which has infinitely many extreme points.
    """
    K = self.num_domains
    if self.kind == "simplex":
      return np.eye(K)
    if self.kind != "box":
      raise InputError(f"a {self.kind} uncertainty set has no finite vertex set.")
    lo, hi = np.asarray(self.lo_K, np.float64), np.asarray(self.hi_K, np.float64)
    found = []
    # A vertex of {lo ≤ λ ≤ hi, Σλ = 1} has at most one coordinate off its bounds.
    for free in range(K):
      others = [k for k in range(K) if k != free]
      for at_hi in itertools.product([False, True], repeat=K - 1):
        lam = np.empty(K)
        for k, up in zip(others, at_hi):
          lam[k] = hi[k] if up else lo[k]
        lam[free] = 1.0 - lam[others].sum()
        if lo[free] - _FEASIBILITY_ATOL <= lam[free] <= hi[free] + _FEASIBILITY_ATOL:
          found.append(np.clip(lam, lo, hi))
    return np.unique(np.round(np.array(found), 12), axis=0)


def simplex(num_domains: int) -> UncertaintySet:
  """The whole simplex Δ_K (the default Λ)."""
  K = _check_num_domains(num_domains)
  return UncertaintySet(
    lo_K=jnp.zeros(K),
    hi_K=jnp.ones(K),
    prior_K=jnp.full(K, 1.0 / K),
    radius=jnp.asarray(jnp.inf),
    kind="simplex",
  )


def box(lo, hi) -> UncertaintySet:
  """Λ = {λ ∈ Δ_K : lo ≤ λ ≤ hi}; raises InputError when it is empty."""
  lo = _check_vector(lo, "box lo")
  hi = _check_vector(hi, "box hi")
  if lo.shape != hi.shape:
    raise InputError(f"box lo has shape {lo.shape} but hi has {hi.shape}.")
  if np.any(lo < 0) or np.any(hi > 1):
    raise InputError(
      f"box bounds must lie in [0, 1] (inside the simplex); got lo={lo.tolist()}, hi={hi.tolist()}."
    )
  if np.any(lo > hi):
    k = int(np.argmax(lo > hi))
    raise InputError(f"box is empty: lo[{k}]={lo[k]} > hi[{k}]={hi[k]}.")
  if lo.sum() > 1 + _FEASIBILITY_ATOL or hi.sum() < 1 - _FEASIBILITY_ATOL:
    raise InputError(
      f"box admits no mixture: need sum(lo) ≤ 1 ≤ sum(hi), got "
      f"sum(lo)={lo.sum():.6g}, sum(hi)={hi.sum():.6g}."
    )
  lo_K, hi_K = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  centre = jnp.exp(_project_box_log(jnp.full(lo.shape, -np.log(lo.size)), lo_K, hi_K))
  return UncertaintySet(
    lo_K=lo_K, hi_K=hi_K, prior_K=centre, radius=jnp.asarray(jnp.inf), kind="box"
  )


def kl_ball(prior, radius: float) -> UncertaintySet:
  """Λ = {λ ∈ Δ_K : KL(λ ‖ prior) ≤ radius}; `prior` must be a mixture."""
  prior = _check_vector(prior, "kl_ball prior")
  if np.any(prior < 0) or abs(prior.sum() - 1) > 1e-4:
    raise InputError(
      f"kl_ball prior must be a point of the simplex, got {prior.tolist()} (sum {prior.sum():.6g})."
    )
  radius = float(radius)
  if not np.isfinite(radius) or radius < 0:
    raise InputError(f"kl_ball radius must be finite and ≥ 0, got {radius}.")
  prior = prior / prior.sum()
  return UncertaintySet(
    lo_K=jnp.zeros(prior.size),
    hi_K=jnp.ones(prior.size),
    prior_K=jnp.asarray(prior, jnp.float32),
    radius=jnp.asarray(radius, jnp.float32),
    kind="kl_ball",
  )


def from_config(config, num_domains: int) -> UncertaintySet:
  """Λ from a config's fields `uncertainty` ("simplex", "box" or "kl_ball"),
  `box_lo`, `box_hi` (the same bounds for every domain) and `kl_radius` (around
  the uniform mixture)."""
  K = _check_num_domains(num_domains)
  kind = config.uncertainty
  if kind == "simplex":
    return simplex(K)
  if kind == "box":
    return box(np.full(K, config.box_lo), np.full(K, config.box_hi))
  if kind == "kl_ball":
    return kl_ball(np.full(K, 1.0 / K), config.kl_radius)
  raise InputError(f"unknown config.uncertainty {kind!r}; choose simplex, box or kl_ball.")


def _check_num_domains(num_domains) -> int:
  if isinstance(num_domains, bool) or not isinstance(num_domains, (int, np.integer)):
    raise InputError(f"number of domains must be an int, got {num_domains!r}.")
  if num_domains < 1:
    raise InputError(f"number of domains K must be ≥ 1, got {num_domains}.")
  return int(num_domains)


def _check_vector(x, name: str) -> np.ndarray:
  arr = np.asarray(x, np.float64)
  if arr.ndim != 1 or arr.size == 0:
    raise InputError(f"{name} must be a non-empty vector, got shape {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    raise InputError(f"{name} contains NaN or infinite values: {arr.tolist()}.")
  return arr


def kl_np(probs_KxN: np.ndarray, q_N: np.ndarray) -> np.ndarray:
  """KL(p_k ‖ q) of each row p_k in float64 numpy, [K] (or a scalar for one p); inf where
  q misses p_k's mass, 0·log 0 = 0. The one KL of the package's numpy code (Λ's KL
  ball here, the exact objectives of robust_gate.finite)."""
  pos = probs_KxN > 0
  q_KxN = np.broadcast_to(q_N, probs_KxN.shape)
  with np.errstate(divide="ignore"):
    log_ratio = np.where(
      pos, np.log(np.where(pos, probs_KxN, 1.0)) - np.log(np.where(pos, q_KxN, 1.0)), 0.0
    )
  return np.sum(probs_KxN * log_ratio, axis=-1)


def _log_kl(log_p_K, log_q_K):
  """KL(p ‖ q) from log-probabilities; 0·log 0 terms are 0."""
  p_K = jnp.exp(log_p_K)
  diff_K = jnp.where(p_K > 0, log_p_K - log_q_K, 0.0)
  return jnp.sum(p_K * diff_K)


def _project_box_log(log_q_K, lo_K, hi_K):
  """λ_k = clip(c·q_k, lo_k, hi_k) with c found by bisection on log c."""
  log_lo_K, log_hi_K = jnp.log(lo_K), jnp.log(hi_K)

  def clipped(log_c):
    return jnp.clip(log_q_K + log_c, log_lo_K, log_hi_K)

  def body(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    too_big = jnp.sum(jnp.exp(clipped(mid))) > 1.0
    return jnp.where(too_big, a, mid), jnp.where(too_big, mid, b)

  finite_q = jnp.where(jnp.isfinite(log_q_K), log_q_K, 0.0)
  a0 = jnp.asarray(-100.0, log_q_K.dtype)
  b0 = 100.0 - jnp.min(finite_q)
  a, b = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (a0, b0))
  log_lam_K = clipped(0.5 * (a + b))
  return log_lam_K - jax.nn.logsumexp(log_lam_K)


def _project_kl_ball_log(log_q_K, prior_K, radius):
  """λ_t ∝ q^(1−t)·prior^t, the smallest t ∈ [0, 1] with KL(λ_t ‖ prior) ≤ r."""
  log_prior_K = jnp.log(prior_K)

  def geodesic(t):
    mixed_K = jnp.where(prior_K > 0, (1 - t) * log_q_K + t * log_prior_K, -jnp.inf)
    return jax.nn.log_softmax(mixed_K)

  def body(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    inside = _log_kl(geodesic(mid), log_prior_K) <= radius
    return jnp.where(inside, a, mid), jnp.where(inside, mid, b)

  already_inside = _log_kl(log_q_K, log_prior_K) <= radius
  _, t = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (jnp.zeros(()), jnp.ones(())))
  projected_K = jnp.where(t >= 1.0, jnp.where(prior_K > 0, log_prior_K, -jnp.inf), geodesic(t))
  return jnp.where(already_inside, log_q_K, projected_K)


def _max_linear_box(c_K, lo_K, hi_K):
  """Greedy fill from lo: the largest c_k get their room hi_k − lo_k first."""
  order_K = jnp.argsort(-c_K)
  room_K = (hi_K - lo_K)[order_K]
  left = 1.0 - jnp.sum(lo_K)
  given_before_K = jnp.cumsum(room_K) - room_K
  alloc_K = jnp.clip(left - given_before_K, 0.0, room_K)
  return lo_K + jnp.zeros_like(c_K).at[order_K].set(alloc_K)


def _max_linear_kl_ball(c_K, prior_K, radius):
  """Gibbs tilt λ_β ∝ prior·exp(β c), β found by bisection so KL(λ_β‖prior) = r."""
  log_prior_K = jnp.where(prior_K > 0, jnp.log(prior_K), -jnp.inf)
  scale = jnp.maximum(jnp.max(c_K) - jnp.min(c_K), 1e-30)
  c_unit_K = (c_K - jnp.max(c_K)) / scale

  def tilt(log_beta):
    return jax.nn.log_softmax(log_prior_K + jnp.exp(log_beta) * c_unit_K)

  def body(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    inside = _log_kl(tilt(mid), log_prior_K) <= radius
    return jnp.where(inside, mid, a), jnp.where(inside, b, mid)

  a, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (jnp.asarray(-30.0), jnp.asarray(30.0)))
  return jnp.exp(tilt(a))
