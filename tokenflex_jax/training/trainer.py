"""The one trainer core: everything a training run does the same way, whatever it trains.

A `Task` says what differs (the model's parameters, the loss, the batch and the data,
the token-count buckets); `train` does the rest, in this order:

1. `plan_task`: the optimizer from the config and every state sharding derived from
   the params' logical axes;
2. `start_state`: resumed from the workdir's newest good checkpoint (params, optimizer
   state and data-iterator position), else random, with the modules ``config.init``
   names loaded from another workdir;
3. `compile_steps`: one train step per bucket compiled ahead of time (the loop never
   compiles);
4. `loop.train_loop` until ``config.total_steps``, with metrics and checkpoints; a stop
   on SIGTERM / a preemption notice raises `errors.Preempted` after its save.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from tokenflex_jax import errors, sharding, specs
from tokenflex_jax.data import pipeline
from tokenflex_jax.training import checkpointing, compiled, loop, optimizer as optimizer_lib
from tokenflex_jax.training import buckets as buckets_lib, steps
from tokenflex_jax.training.metrics import MetricWriter
from tokenflex_jax.specs import RunSpec


@dataclasses.dataclass(frozen=True)
class Task:
  """What one kind of training is.

  init_params: rng -> the params, boxed with their logical axes.
  loss_fn: (params, batch, num_tokens) -> (scalar loss, {name: scalar metric}).
  abstract_batch: the global batch's `jax.ShapeDtypeStruct`s, with their shardings.
  data_from: a global batch index -> the host's data iterator starting there.
  buckets: the visual-token counts (each compiled once) and the draw of one per step.
  tokens_per_example: a bucket -> sequence positions per example (for throughput).
  name: what the compiled step is called in the logs.
  flops_per_step: a bucket -> model FLOPs of one global step (`models.flops`), for
    the logged FLOP rate; None: XLA's cost analysis, which counts a scanned loop once.
  evaluate: (params, step) -> {name: scalar}, run every ``eval_every`` steps by the loop
    (on every process: it may be collective); None: no periodic evaluation.
  eval_every: the cadence of ``evaluate`` in steps (0: never).
  skipped_records: () -> {reason: records} the data has skipped so far
    (``config.data.on_bad_record = "skip"``, `pipeline.SkippedRecords.counts`); None: none.
  microbatches: gradient accumulation, the global batch in this many microbatches per
    step (`steps.make_train_step`).
  count_per_microbatch: each microbatch draws its own visual-token count
    (`buckets.Buckets.for_microbatches`) and runs through that count's compiled forward
    and backward (`steps.MicrobatchStep`); False: one count per step.
  source_counts: () -> {source: examples} this host was fed from each source of a
    mixture (``config.data.mixture``, `pipeline.SourceCounts.counts`); None: one source.
  """
  init_params: steps.InitParams
  loss_fn: steps.LossFn
  abstract_batch: Mapping[str, jax.ShapeDtypeStruct]
  data_from: Callable[[int], Iterator[Mapping[str, Any]]]
  buckets: buckets_lib.Buckets
  tokens_per_example: Callable[[int], int]
  name: str = "train step"
  flops_per_step: Callable[[int], float] | None = None
  evaluate: Callable[[Any, int], Mapping[str, float]] | None = None
  eval_every: int = 0
  skipped_records: Callable[[], Mapping[str, int]] | None = None
  microbatches: int = 1
  count_per_microbatch: bool = False
  source_counts: Callable[[], Mapping[str, int]] | None = None


@dataclasses.dataclass(frozen=True)
class TaskPlan:
  """A task's optimizer and its state's shardings and shapes, worked out from shapes
  alone (nothing compiled, nothing allocated)."""
  optimizer: optimizer_lib.Optimizer
  state_shardings: steps.TrainState
  abstract_state: steps.TrainState   # `jax.ShapeDtypeStruct`s with their shardings


@dataclasses.dataclass(frozen=True)
class CompiledTask(TaskPlan):
  """A `TaskPlan` with its train step compiled per bucket: {count: step} (with
  ``count_per_microbatch``: every microbatch at that count), and the step of every draw
  (the loop's)."""
  steps: dict[int, compiled.CompiledStep]
  draws: loop.BucketSteps


def plan_task(config: RunSpec, task: Task, mesh, rules) -> TaskPlan:
  """The optimizer from ``config`` and the state's shardings (derived from the params'
  logical axes) and shapes, from shapes alone."""
  boxed = steps.boxed_params(task.init_params, mesh, rules)
  params = sharding.strip_boxes(boxed)
  optimizer = optimizer_lib.from_config(config, params)
  state_sh = steps.state_shardings(boxed, optimizer.tx, mesh, rules)
  return TaskPlan(optimizer, state_sh, steps.abstract_state(params, optimizer.tx, state_sh))


def compile_steps(task: Task, plan: TaskPlan, mesh, rules,
                  options: Mapping[str, Any] | None = None,
                  memory_of: compiled.MemoryOf | None = None) -> CompiledTask:
  """``plan`` with the train step lowered and compiled once per bucket (with
  ``task.count_per_microbatch``: a microbatch's forward and backward once per bucket,
  the update once), with the compiler ``options`` (`compiled.compiler_options`), each
  program's memory read by ``memory_of`` (default `compiled.pjrt_memory`)."""
  counts = task.buckets.counts
  if task.count_per_microbatch:
    k = task.microbatches
    pieces = compiled.compile_microbatch_buckets(
        steps.make_microbatch_step(task.loss_fn, plan.optimizer, k, task.abstract_batch,
                                   counts[0]),
        plan.abstract_state, task.abstract_batch, counts, mesh, rules, task.name, options,
        memory_of)
    return CompiledTask(plan.optimizer, plan.state_shardings, plan.abstract_state,
                        pieces.every_microbatch_at(), loop.BucketSteps(
                            pieces.step, lambda step: task.buckets.for_microbatches(step, k)))
  by_count = compiled.compile_buckets(steps.make_train_step(task.loss_fn, plan.optimizer,
                                                          task.microbatches),
                                      plan.abstract_state, task.abstract_batch, counts,
                                      mesh, rules, task.name, options, memory_of)
  return CompiledTask(plan.optimizer, plan.state_shardings, plan.abstract_state, by_count,
                      loop.BucketSteps(by_count.__getitem__, task.buckets.for_step))


def compile_task(config: RunSpec, task: Task, mesh, rules,
                 memory_of: compiled.MemoryOf | None = None) -> CompiledTask:
  """`plan_task` and `compile_steps`: everything a run needs before its first step."""
  return compile_steps(task, plan_task(config, task, mesh, rules), mesh, rules,
                       compiled.compiler_options(config.compiler_optimization_level),
                       memory_of)


def flops_per_device(task: Task, job: CompiledTask) -> dict[int, float]:
  """{bucket: FLOPs of one step per device}: the task's model FLOPs, else XLA's count."""
  if task.flops_per_step is None:
    return {n: c.flops for n, c in job.steps.items()}
  out = {n: task.flops_per_step(n) / jax.device_count() for n in job.steps}
  for n, c in job.steps.items():
    logging.info("bucket %d: %.4g model GFLOP per step and device (XLA's cost analysis, "
                 "a scanned loop counted once: %.4g)", n, out[n] / 1e9, c.flops / 1e9)
  return out


def start_state(config: RunSpec, task: Task, plan: TaskPlan,
                manager: Any, mesh, rules
                ) -> tuple[steps.TrainState, int, Iterator[Mapping[str, Any]]]:
  """(state, first step, data iterator positioned for it): resumed from ``manager``'s
  latest checkpoint, else fresh (random, with ``config.init``'s modules loaded).

  The data iterator's state comes from the checkpoint when it has one for this
  process layout, else (written by another number of processes) from the step.
  """
  data = task.data_from(0)
  abstract, optimizer, state_sh = plan.abstract_state, plan.optimizer, plan.state_shardings
  with sharding.mesh_rules(mesh, rules):
    restored = checkpointing.restore_latest(manager, abstract.params, abstract.opt_state, data)
  if restored is not None:
    latest, params, opt_state, _, data_restored = restored
    logging.info("resumed from %s at step %d", manager.directory, latest)
    data = data if data_restored else task.data_from(latest)
    return steps.TrainState(jnp.asarray(latest, jnp.int32), params, opt_state), latest, data
  state = steps.random_state(task.init_params, optimizer.tx, jax.random.key(config.seed),
                             state_sh, mesh, rules)
  with sharding.mesh_rules(mesh, rules):
    loaded = checkpointing.load_init_modules(config.init, abstract.params)
    if loaded is not None:
      state = steps.with_params(state, loaded, optimizer, state_sh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("initialised a fresh state: %.3fM parameters", n_params / 1e6)
  return state, 0, data


def check_loop_config(config: RunSpec) -> None:
  """Raises `errors.ConfigError` naming the field if the loop's cadences or batch are unusable."""
  for name in ("batch_size", "microbatches", "log_every", "checkpoint_every",
               "keep_checkpoints"):
    if getattr(config, name) <= 0:
      raise errors.ConfigError(f"config.{name} must be positive, got {getattr(config, name)}")
  if config.batch_size % config.microbatches:
    raise errors.ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                             f"config.microbatches={config.microbatches}")


def data_counts(task: Task) -> dict[str, float]:
  """What the task's data did so far on this host: the bad records it skipped
  (``config.data.on_bad_record = "skip"``: {"skipped_records": total,
  "skipped_records/<reason>": n}) and, from a mixture, the examples of each source
  ({"examples_from/<source>": n}); {} if neither."""
  counts = task.skipped_records() if task.skipped_records else {}
  out = {}
  if counts:
    out["skipped_records"] = float(sum(counts.values()))
    out.update({f"skipped_records/{reason.replace(' ', '_')}": float(n)
                for reason, n in counts.items()})
  if task.source_counts is not None:  # examples fed so far from each source of a mixture
    out.update({f"examples_from/{name}": float(n) for name, n in task.source_counts().items()})
  return out


def train(config: RunSpec, workdir: str, task: Task, mesh, rules
          ) -> steps.TrainState:
  """Trains ``task`` until ``config.total_steps``, resuming from ``workdir`` (the binary
  has checked ``config``: `app.config_checks`)."""
  warning = optimizer_lib.warmup_warning(config.optimizer, config.total_steps)
  if warning:
    logging.warning("%s", warning)
  plan = plan_task(config, task, mesh, rules)
  checkpointing.remove_temporary(workdir)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  # Restored before compiling, so that a damaged or mismatched checkpoint is reported
  # at once, not after minutes of compilation.
  state, start, data = start_state(config, task, plan, manager, mesh, rules)
  job = compile_steps(task, plan, mesh, rules,
                      compiled.compiler_options(config.compiler_optimization_level))
  batch_sh = compiled.shardings_of(dict(task.abstract_batch))
  writer = MetricWriter(workdir)
  reporter = loop.Reporter(writer, config.total_steps, config.log_every, config.batch_size,
                           task.tokens_per_example, flops_per_device(task, job),
                           host_counters=lambda: data_counts(task))
  saver = loop.Saver(manager, config.checkpoint_every,
                     lambda step: {"step": step, "stage": config.stage, "config": specs.as_dict(config)},
                     writer.flush)
  logging.info("training steps %d -> %d, buckets %s", start, config.total_steps,
               task.buckets.counts)
  try:
    state, done = loop.train_loop(
        state, start, config.total_steps, job.draws,
        loop.DataFeed(data, lambda b: pipeline.to_global_batch(b, batch_sh)), saver, reporter,
        loop.Periodic(task.eval_every, task.evaluate) if task.evaluate else None)
  except errors.NonFiniteLossError as e:
    checkpointing.finish(manager)  # The last save's checksums too: it is where to resume.
    last = manager.latest_step()
    where = (f"step {last} ({manager.directory}/{last}), where a restart resumes"
             if last is not None else "none (a restart starts from scratch)")
    raise errors.NonFiniteLossError(f"{e} Last good checkpoint: {where}.") from None
  finally:  # Also on a non-finite loss: finish the save in flight, flush the metrics.
    writer.close()
    manager.close()
  if done < config.total_steps:
    raise errors.Preempted(f"stopped at step {done} of {config.total_steps} on SIGTERM / a "
                           f"preemption notice; step {done} is saved in {manager.directory}: "
                           f"run the same command again to resume (exit code "
                           f"{errors.PREEMPTED_EXIT_CODE})")
  return state
