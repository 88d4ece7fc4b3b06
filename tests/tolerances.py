"""Tolerances for comparing the library's float32 results with exact references.

The library computes in float32 (machine epsilon 1.2e-7). A result that went through
tens of operations carries a relative rounding error of up to about 1e-6, and which
way it rounds changes with the XLA version and the CPU: a test that compares at 1e-6
passes on one machine and fails on a fresh install. Tests compare float32 results at
`F32_RTOL`, ten times that; quantities the library computes in float64 are compared
tighter, where they are.
"""

F32_RTOL = 1e-5
