"""The environment of a process a test starts with `n` simulated CPU devices."""

import os


def env_with_devices(n: int, base: dict | None = None) -> dict:
  """`base` (default: this process's environment) with XLA_FLAGS asking for `n` CPU
  devices, on top of the flags already there."""
  env = dict(os.environ if base is None else base)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  return env
