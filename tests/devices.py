"""The environment of a process a test starts: the launchers' shared persistent
compilation cache, and `n` simulated CPU devices where asked."""

import os

# The processes tests start (launchers, children on simulated devices) share one
# persistent compilation cache: a program compiled once in a run, or in an earlier run
# on this machine, is read instead of compiled again (the executables are the same, so
# are the results). The pytest workers themselves keep it off (conftest.py).
# No size limit (-1, jax's default; launch/reproduce.sh sets one for its chains): a limit
# turns on jax's LRU eviction, which takes a file lock around every read and write and,
# on every write, stats and reads every entry already there. A cold run of the suite
# writes about 2,200 entries (most of them small programs, each compiled in well under
# a second), so the writes alone cost about 2 CPU minutes (106 ms a write at 2,200
# entries), and every process's reads waited on the lock meanwhile. Without the lock
# jax writes an entry in place: a read that meets one half written fails to decompress,
# and jax compiles the program instead (a warning, the same executable).
COMPILATION_CACHE = {
  "JAX_COMPILATION_CACHE_DIR": os.path.join(
    os.environ.get("PYTEST_TMPDIR", "/tmp"), f"robust_gate_jax_cache_{os.getuid()}"
  ),
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  "JAX_COMPILATION_CACHE_MAX_SIZE": "-1",
}


def env_with_devices(n: int, base: dict | None = None) -> dict:
  """`base` (default: this process's environment with the shared compilation cache) with
  XLA_FLAGS asking for `n` CPU devices, on top of the flags already there."""
  env = dict({**os.environ, **COMPILATION_CACHE} if base is None else base)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  return env
