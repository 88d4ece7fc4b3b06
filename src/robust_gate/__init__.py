"""robust_gate: modular, robust generative modeling in JAX (see MATH.md)."""

from robust_gate import checks
from robust_gate import dual
from robust_gate import finite
from robust_gate import gating
from robust_gate import objectives
from robust_gate import primal_dual
from robust_gate import uncertainty
from robust_gate.checks import InputError

__all__ = ["checks", "dual", "finite", "gating", "objectives", "primal_dual",
           "uncertainty", "InputError"]
__version__ = "0.1.0"
