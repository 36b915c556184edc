"""XLA_FLAGS for test processes (no JAX import here: conftest.py sets them before JAX
loads, and tests pass them to the binaries they start).

Tests compile far more than they run. LLVM's cheapest optimisation level with XLA's
older (LLVM IR) fusion emitters makes the suite's programs compile faster (the figures:
docs/testing.md). XLA's own HLO passes, which decide fusion and sharding,
run as in production; only the code each fusion becomes differs (its floating-point
rounding may, in the last bits: tests compare within tolerances, or runs compiled alike).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: the fast compile, on ``devices`` simulated host
  devices (None: the platform's own count, one CPU device)."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + FAST_COMPILE


def binary_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """The environment of a binary a test starts: this one's, with the repository on
  PYTHONPATH, the CPU platform, `xla_flags` (``devices``) and ``extra``."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
             **extra)
  env.pop("PYTEST_CURRENT_TEST", None)
  return env
