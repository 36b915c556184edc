"""Wall-clock timing of device work, and this host's matmul roofline."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax.training import loop


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call: the median and the spread (min, max) over the timed calls."""
  median: float
  low: float
  high: float
  calls: int

  @classmethod
  def of(cls, seconds: list[float]) -> "Timing":
    return cls(float(np.median(seconds)), float(min(seconds)), float(max(seconds)),
               len(seconds))

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def time_calls(fn: Callable[[], Any], calls: int) -> list[float]:
  """Seconds of each of ``calls`` calls of ``fn()``, each waited for (its outputs
  blocked on, so asynchronous dispatch does not hide device time)."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def time_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batch: Any,
               calls: int) -> tuple[list[float], Any]:
  """Seconds per call of ``state, metrics = step(state, batch)`` (the state is donated,
  so each call takes the one before's), and the final state."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return times, state


def roofline_gflops(dtype: str, size: int = 2048, calls: int = 10) -> float:
  """This host's matmul rate: the median GFLOP/s of a [size, size] @ [size, size]
  product in ``dtype`` on the first device."""
  x = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(x))
  seconds = float(np.median(time_calls(lambda: matmul(x), calls)))
  return 2 * size ** 3 / seconds / 1e9


def mfu(flops_per_device: float, step_s: float, roofline: float,
        devices: Sequence[Any]) -> float:
  """Model FLOPs utilisation of a step against `roofline_gflops` (measured on
  ``devices[0]``): an accelerator's roofline is one chip's, so a device's share of the
  step against it; host CPU devices share the cores that roofline already used, so the
  whole step's."""
  shares = len(devices) if devices[0].platform == "cpu" else 1
  return flops_per_device * shares / step_s / 1e9 / roofline


def peak_gib() -> float | None:
  """The most memory the first device has held since the process started, in GiB, where
  its runtime keeps the figure (GPUs and TPUs do; a CPU does not: None)."""
  return loop.device_memory_gib(loop.memory_stats(jax.devices()[0])).get("device_peak_gib")
