"""The training loop shared by the VLM trainer and the vision pre-training stage.

Per step: pick the bucket, fetch the host batch, run that bucket's compiled step,
then read the *previous* step's metrics (so logging never stalls the device queue),
check them for NaN/Inf, write them, and save a checkpoint when due. SIGTERM (on any
host) makes every host save the same step and return cleanly.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tokenflex_jax.training import checkpointing
from tokenflex_jax.training.metrics import MetricWriter, log_line


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradient norm is NaN or Inf."""


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls (restores the old handler on exit). Only
  in a single-process run: with several, JAX's preemption service owns SIGTERM."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: saving a checkpoint and exiting")
      self.raised = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. some test runners): no handler.
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def stop_requested(step: int, raised_here: bool) -> bool:
  """True on every process at the same step once any process got SIGTERM, so all of
  them save that step together (the save is collective) and stop.

  With several processes this is JAX's preemption service: the coordination service
  catches SIGTERM and the processes agree on the step over it, with no device collective,
  so the host never waits for the device queue. It must be asked at every step.
  """
  if jax.process_count() == 1:
    return raised_here
  if multihost_utils.reached_preemption_sync_point(step):
    logging.warning("preemption notice (SIGTERM on some process): every process saves "
                    "step %d and exits", step)
    return True
  return False


def train_loop(*, state: Any, start_step: int, total_steps: int,
               compiled: Mapping[int, Any], count_for_step: Callable[[int], int],
               data_iterator: Any, to_global: Callable[[Any], Any],
               tokens_per_example: Callable[[int], int], flops_per_step: Mapping[int, float],
               manager: Any, writer: MetricWriter, meta: Callable[[int], dict],
               log_every: int, checkpoint_every: int, global_batch: int) -> tuple[Any, int]:
  """Runs steps [start_step, total_steps); returns (state, last completed step)."""
  num_devices = jax.device_count()
  pending = None  # (step, num_tokens, metrics still on device)
  clock = {"ready": time.perf_counter()}  # when the last reported step's metrics arrived
  step = start_step

  def report(p):
    s, n, metrics = p
    host = {k: float(np.asarray(v)) for k, v in metrics.items()}  # Waits for step s.
    now = time.perf_counter()
    # Time between consecutive completed steps: the pipeline's throughput, data included.
    step_time, clock["ready"] = now - clock["ready"], now
    if not (math.isfinite(host["loss"]) and math.isfinite(host.get("grad_norm", 0.0))):
      raise NonFiniteLossError(
          f"step {s + 1}: non-finite loss={host['loss']} grad_norm={host.get('grad_norm')} at "
          f"{n} visual tokens; stopping. Lower config.optimizer.learning_rate or check the data.")
    host.update(num_tokens=n, step_time_s=step_time,
                examples_per_s=global_batch / step_time,
                tokens_per_s_per_device=global_batch * tokens_per_example(n) / step_time
                / num_devices,
                tflops_per_device=flops_per_step.get(n, 0.0) / step_time / 1e12)
    scalars = {f"train/{k}": v for k, v in host.items()}
    scalars.update({f"train_{n}tokens/{k}": host[k] for k in
                    ("loss", "grad_norm", "step_time_s", "tokens_per_s_per_device")
                    if k in host})
    writer.write(s + 1, scalars)
    if (s + 1) % log_every == 0 or s + 1 == total_steps or s == start_step:
      log_line(s + 1, total_steps, host)

  with _SigtermFlag() as sigterm:
    for step in range(start_step, total_steps):
      n = count_for_step(step)
      batch = to_global(next(data_iterator))
      state, metrics = compiled[n](state, batch)
      if pending is not None:
        report(pending)  # The previous step, while this one runs.
      pending = (step, n, metrics)
      done = step + 1
      stop = stop_requested(done, sigterm.raised)
      if done % checkpoint_every == 0 or done == total_steps or stop:
        report(pending)
        pending = None
        checkpointing.save(manager, done, state.params, state.opt_state, data_iterator,
                           meta(done))
        clock["ready"] = time.perf_counter()  # Saving is not step time.
      if stop:
        break
    if pending is not None:
      report(pending)
  manager.wait_until_finished()
  return state, (step + 1 if total_steps > start_step else start_step)
