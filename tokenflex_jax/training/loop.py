"""The training loop shared by the VLM trainer and the vision pre-training stage.

Per step: pick the bucket, fetch the host batch, run that bucket's compiled step,
then read the *previous* step's metrics (so logging never stalls the device queue),
check them for NaN/Inf, write them, and save a checkpoint when due. SIGTERM (on any
host) makes every host save the same step and return cleanly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tokenflex_jax.errors import NonFiniteLossError
from tokenflex_jax.training import checkpointing
from tokenflex_jax.training.metrics import MetricWriter, log_line


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


# A step's visual-token count, or one count per microbatch (``config.count_per_microbatch``).
Draw = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BucketSteps:
  """The step function of each draw, ``step_for(draw)``: ``(state, batch) -> (state,
  metrics)`` (compiled executables in a run), and the rule that draws each step's
  count(s), ``count_for_step(step)``."""
  step_for: Callable[[Draw], Callable[[Any, Any], tuple[Any, Mapping[str, Any]]]]
  count_for_step: Callable[[int], Draw]


@dataclasses.dataclass(frozen=True)
class DataFeed:
  """Host-local batches and the function that assembles them into global arrays."""
  iterator: Iterator[Mapping[str, Any]]
  to_global: Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Saver:
  """Checkpoints every ``every`` steps (and at the end or on SIGTERM) into ``manager``;
  ``meta(step)`` is the JSON metadata saved with each; ``flush()`` runs first (the
  metrics: every step a checkpoint holds has its metrics stored)."""
  manager: Any
  every: int
  meta: Callable[[int], dict]
  flush: Callable[[], None] = lambda: None

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    self.flush()
    checkpointing.save(self.manager, step, state.params, state.opt_state, data_iterator,
                       self.meta(step))


def resident_mib() -> float:
  """This process's resident memory now (MiB; /proc, so 0.0 where there is none): logged
  per step so that a leak shows as a rising curve (docs/failures.md, the soak)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    return 0.0


def device_memory_gib(stats: Mapping[str, int] | None) -> dict[str, float]:
  """A device's memory as its runtime counts it, from ``device.memory_stats()`` (GPUs and
  TPUs keep one; a CPU gives None: {}): ``device_peak_gib``, the most it has held since
  the process started, and ``device_limit_gib``, what it can hold; each where reported.
  The compile's figures (`compiled.log_compiled`, `aot`) predict the peak; this measures
  it."""
  names = {"peak_bytes_in_use": "device_peak_gib", "bytes_limit": "device_limit_gib"}
  return {name: stats[key] / 2**30 for key, name in names.items() if key in (stats or {})}


def memory_stats(device: Any) -> Mapping[str, int] | None:
  """``device.memory_stats()``, or None where its backend does not implement it."""
  try:
    return device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # e.g. a plugin's UNIMPLEMENTED
    return None


@dataclasses.dataclass(frozen=True)
class Periodic:
  """``fn(params, step) -> {name: scalar}`` every ``every`` completed steps (0: never),
  e.g. an evaluation; its scalars are written at that step."""
  every: int
  fn: Callable[[Any, int], Mapping[str, float]]

  def due(self, done: int) -> bool:
    return self.every > 0 and done % self.every == 0


class Reporter:
  """Turns a step's device metrics into logged scalars: fetches them (the only wait on
  the device), stops on a non-finite loss, adds throughput, writes and logs them.

  ``host_counters()`` adds host-side counts (e.g. skipped bad records) to each step's
  scalars. The step time is the time between two consecutive reports: the pipeline's
  throughput, data included; `restart_clock` excludes what is not a step (a save).
  """

  def __init__(self, writer: MetricWriter, total_steps: int, log_every: int,
               global_batch: int, tokens_per_example: Callable[[int], int],
               flops_per_step: Mapping[int, float],
               host_counters: Callable[[], Mapping[str, float]] = dict):
    self._writer, self._total, self._log_every = writer, total_steps, log_every
    self._counters = host_counters
    self._batch, self._tokens, self._flops = global_batch, tokens_per_example, flops_per_step
    self._devices = jax.device_count()
    self._device = jax.local_devices()[0]  # whose memory each step reports
    self._first: int | None = None
    self.restart_clock()

  def restart_clock(self) -> None:
    self._ready = time.perf_counter()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes scalars that are not a train step's (e.g. a periodic evaluation's)."""
    self._writer.write(step, scalars)

  def report(self, step: int, draw: Draw, metrics: Mapping[str, Any]) -> None:
    """Reports step ``step`` (0-based; logged as ``step + 1``, the steps completed) run at
    ``draw`` visual tokens (a tuple: its microbatches', each 1/k of the batch; logged as
    their mean)."""
    counts = draw if isinstance(draw, tuple) else (draw,)
    single = len(set(counts)) == 1  # the step is at one count (bucket)
    num_tokens = counts[0] if single else float(np.mean(counts))
    positions = float(np.mean([self._tokens(n) for n in counts]))  # per example
    flops = float(np.mean([self._flops.get(n, 0.0) for n in counts]))
    host = {k: float(np.asarray(v)) for k, v in metrics.items()}  # Waits for the step.
    now = time.perf_counter()
    step_time, self._ready = now - self._ready, now
    if self._first is None:
      self._first = step
    if not (math.isfinite(host["loss"]) and math.isfinite(host.get("grad_norm", 0.0))):
      raise NonFiniteLossError(
          f"step {step + 1}: non-finite loss={host['loss']} grad_norm={host.get('grad_norm')} "
          f"at {draw} visual tokens; stopping. Lower config.optimizer.learning_rate or "
          "check the data.")
    host.update(num_tokens=num_tokens, step_time_s=step_time, host_rss_mib=resident_mib(),
                examples_per_s=self._batch / step_time,
                tokens_per_s_per_device=self._batch * positions / step_time / self._devices,
                tflops_per_device=flops / step_time / 1e12,
                **device_memory_gib(memory_stats(self._device)))
    if "useful_positions" in host:  # real text and visual tokens among the paid positions
      paid = self._batch * positions
      host.update(useful_share=host["useful_positions"] / paid,
                  useful_tokens_per_s_per_device=host.pop("useful_positions") / step_time
                  / self._devices)
    host.update(self._counters())
    scalars = {f"train/{k}": v for k, v in host.items()}
    if single:
      scalars.update({f"train_{num_tokens}tokens/{k}": host[k] for k in
                      ("loss", "grad_norm", "step_time_s", "tokens_per_s_per_device")
                      if k in host})
    self._writer.write(step + 1, scalars)
    if (step + 1) % self._log_every == 0 or step + 1 == self._total or step == self._first:
      log_line(step + 1, self._total, host)


def train_loop(state: Any, start_step: int, total_steps: int, steps: BucketSteps,
               data: DataFeed, saver: Saver, reporter: Reporter,
               periodic: Periodic | None = None) -> tuple[Any, int]:
  """Runs steps [start_step, total_steps); returns (state, steps completed).

  Each step's metrics are reported while the next step runs, so the host never waits
  for the device except to save and for ``periodic``. ``periodic`` runs before its
  step's save (a run killed while it evaluates resumes from the save before and
  evaluates that step again; one whose evaluation raises saves first), except at a stop
  requested by SIGTERM, which saves at once and skips it.
  """
  pending = None  # (step, its draw, metrics still on device)
  done = start_step
  reporter.restart_clock()
  with _SigtermFlag() as sigterm:
    for step in range(start_step, total_steps):
      n = steps.count_for_step(step)
      state, metrics = steps.step_for(n)(state, data.to_global(next(data.iterator)))
      if pending is not None:
        reporter.report(*pending)  # The previous step, while this one runs.
      pending, done = (step, n, metrics), step + 1
      stop = stop_requested(done, sigterm.raised)
      save = done % saver.every == 0 or done == total_steps or stop
      if periodic is not None and periodic.due(done) and not stop:
        reporter.report(*pending)
        pending = None
        try:
          reporter.write(done, periodic.fn(state.params, done))
        except Exception:
          if save:  # An evaluation that fails loses no training.
            saver.save(done, state, data.iterator)
            checkpointing.finish(saver.manager)
          raise
        reporter.restart_clock()  # Evaluating is not step time.
      if save:
        if pending is not None:
          reporter.report(*pending)
          pending = None
        saver.save(done, state, data.iterator)
        reporter.restart_clock()  # Nor is saving.
      if stop:
        break
    if pending is not None:
      reporter.report(*pending)
  checkpointing.finish(saver.manager)
  return state, done
