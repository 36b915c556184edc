"""XLA_FLAGS for test processes (no JAX import here: conftest.py sets them before JAX
loads, and tests pass them to the binaries they start).

Tests compile far more than they run. LLVM's cheapest optimisation level compiles the
suite's programs faster (docs/testing.md); XLA's own passes, which decide fusion,
sharding and so numerics, run as in production.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: the fast compile, on ``devices`` simulated host
  devices (None: the platform's own count, one CPU device)."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + FAST_COMPILE
