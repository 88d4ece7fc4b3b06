"""robust_gate: modular, robust generative modeling in JAX (see docs/math.md)."""

from robust_gate import checks, dual, finite, gating, objectives, primal_dual, uncertainty
from robust_gate.checks import InputError

__all__ = [
  "InputError",
  "checks",
  "dual",
  "finite",
  "gating",
  "objectives",
  "primal_dual",
  "uncertainty",
]
__version__ = "0.1.0"
