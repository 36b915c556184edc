"""Ahead-of-time compilation of a step once per token-count bucket, with its cost report."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tokenflex_jax import errors, sharding
from tokenflex_jax.training import steps


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """One bucket's executable ``(state, batch) -> (state, metrics)`` and what it costs."""
  executable: Any          # jax.stages.Compiled, or a step of several (`MicrobatchSteps`)
  compile_seconds: float
  flops: float             # per call, per XLA's cost analysis (0 if unavailable)
  memory: Memory | None    # per device (`MemoryOf`; None if unavailable)

  def __call__(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
    return self.executable(state, batch)


def shardings_of(abstract: Any) -> Any:
  """The ``.sharding`` of every leaf of a tree of `jax.ShapeDtypeStruct`s."""
  return jax.tree.map(lambda x: x.sharding, abstract)


def compile_buckets(step_fn: Callable[[Any, Any, int], tuple[Any, dict]], abstract_state: Any,
                    abstract_batch: Mapping[str, jax.ShapeDtypeStruct], counts: Sequence[int],
                    mesh, rules, name: str = "train step",
                    options: Mapping[str, Any] | None = None,
                    memory_of: MemoryOf | None = None) -> dict[int, CompiledStep]:
  """Lowers and compiles ``step_fn(state, batch, n)`` once per ``n`` in ``counts``, with
  the compiler ``options`` (`compiler_options`), each program's memory read by
  ``memory_of`` (default `pjrt_memory`).

  The state and batch are abstract (`jax.ShapeDtypeStruct` with shardings); the state
  is donated and comes back in its own shardings, the metrics replicated. Logs each
  bucket's FLOPs and per-device memory. Returns {n: CompiledStep}.
  """
  state_sh, batch_sh = shardings_of(abstract_state), shardings_of(dict(abstract_batch))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {n: _compiled(f"{name} at bucket {n}", lambda s, b, n=n: step_fn(s, b, n),
                       (state_sh, batch_sh), (state_sh, replicated), (0,),
                       (abstract_state, dict(abstract_batch)), mesh, rules, options=options,
                       memory_of=memory_of)
          for n in counts}


# XLA's optimization levels (the values of xla::ExecutionOptions' EffortLevel), by name.
OPTIMIZATION_LEVELS = {"O0": 9, "O1": 19, "O2": 29, "O3": 39}


def compiler_options(optimization_level: str) -> dict[str, int] | None:
  """What `_compiled` asks of the compiler for ``config.compiler_optimization_level``:
  "" (None: the compiler's default) or one of `OPTIMIZATION_LEVELS`."""
  if not optimization_level:
    return None
  if optimization_level not in OPTIMIZATION_LEVELS:
    raise errors.ConfigError(f"config.compiler_optimization_level must be \"\" or one of "
                             f"{tuple(OPTIMIZATION_LEVELS)}, got {optimization_level!r}")
  return {"optimization_level": OPTIMIZATION_LEVELS[optimization_level]}


# What a program too large for a device's memory can change, by what it runs.
WHOLE_BATCH_ADVICE = "lower config.batch_size"
MICROBATCH_ADVICE = "raise config.microbatches"


def _compiled(what: str, fn: Callable, in_shardings: Any, out_shardings: Any,
              donate: tuple[int, ...], abstract_args: tuple, mesh, rules,
              advice: str = WHOLE_BATCH_ADVICE,
              options: Mapping[str, Any] | None = None,
              memory_of: MemoryOf | None = None) -> CompiledStep:
  """``fn`` jitted with those shardings and donations, lowered on ``abstract_args``
  (`jax.ShapeDtypeStruct`s) under the rules and compiled with the compiler ``options``,
  its memory read by ``memory_of`` (default `pjrt_memory`) and its cost logged as
  ``what``. A program too large for a device is a `errors.ConfigError` naming ``what``
  and ``advice``."""
  t0 = time.perf_counter()
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate)
  with sharding.mesh_rules(mesh, rules):
    lowered = jitted.lower(*abstract_args)
  try:
    executable = lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise errors.ConfigError(
        f"the {what} does not fit a device's memory "
        f"({_first_line(e)}): keep less for the backward pass "
        f"(config.model.remat_policy=dots or full), shard over more devices or "
        f"{advice}") from None
  out = CompiledStep(executable, time.perf_counter() - t0, flops_of(executable),
                     (memory_of or pjrt_memory)(executable))
  log_compiled(what, out)
  return out


@dataclasses.dataclass(frozen=True)
class MicrobatchSteps:
  """The compiled pieces of a `steps.MicrobatchStep` (one ``add`` per bucket); `step`
  makes the step of any draw (a count per microbatch) from them."""
  zeros: CompiledStep             # params -> accumulator
  add: dict[int, CompiledStep]    # count -> (params, acc, batch, j) -> acc
  apply: CompiledStep             # (state, acc) -> (state, metrics)
  microbatches: int               # k
  index_sharding: jax.sharding.Sharding  # j's: replicated
  held_bytes: int                 # per device, held beside every program: the optimizer state

  @functools.cached_property
  def indices(self) -> tuple[jax.Array, ...]:
    """j = 0 .. k-1, put on the devices at the first step (not when compiling: `aot`'s
    devices of a TPU topology hold no arrays)."""
    return tuple(jax.device_put(np.int32(i), self.index_sharding)
                 for i in range(self.microbatches))

  def step(self, counts: tuple[int, ...]) -> Callable[[Any, Any], tuple[Any, dict]]:
    """(state, batch [B, ...]) -> (state, metrics): microbatch j at ``counts[j]`` tokens."""
    if len(counts) != self.microbatches or not set(counts) <= set(self.add):
      raise KeyError(f"a draw of {self.microbatches} of the counts {sorted(self.add)}, "
                     f"got {counts}")

    def run(state, batch):
      acc = self.zeros.executable(state.params)
      for j, n in zip(self.indices, counts):
        acc = self.add[n].executable(state.params, acc, batch, j)
      return self.apply(state, acc)
    return run

  def every_microbatch_at(self) -> dict[int, CompiledStep]:
    """{count: the step with every microbatch at that count, as one `CompiledStep`} (for
    the benchmark and `aot`): its compile time summed over its programs, its FLOPs and
    costs over the programs it runs, its memory their peak."""
    k = self.microbatches
    out = {}
    for n, add in self.add.items():
      composed = _Composed(self.step((n,) * k), (self.zeros, add, self.apply), (1, k, 1),
                           self.held_bytes)
      out[n] = CompiledStep(composed, self.zeros.compile_seconds + add.compile_seconds
                            + self.apply.compile_seconds, flops_of(composed),
                            composed.memory_analysis())
    return out


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of a compiled program (`MemoryOf`): its arguments, outputs,
  temporaries and code, as ``memory_analysis()`` names them, and its total where the
  compiler counts one itself (`total_bytes`)."""
  argument_size_in_bytes: int
  output_size_in_bytes: int
  temp_size_in_bytes: int
  generated_code_size_in_bytes: int
  total_in_bytes: int | None = None


# How a compiled program's `Memory` is read: `pjrt_memory`, or on a TPU target libtpu's
# own count (`benchmarking.tpu_memory.LibtpuMemory`).
MemoryOf = Callable[[Any], "Memory | None"]


def pjrt_memory(executable: Any) -> Memory | None:
  """A compiled program's `Memory` as PJRT's ``memory_analysis()`` gives it (None if the
  compiler gives none). For a TPU program its temporaries count the heap's fragmentation
  twice (`benchmarking.tpu_memory`)."""
  m = executable.memory_analysis()
  if m is None:
    return None
  return Memory(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                m.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class _Composed:
  """A step run as several compiled programs in turn (``programs[i]`` ``runs[i]`` times;
  the last takes the whole state), with a compiled program's interface: called as the
  step; its text and code size those of its programs; its cost summed over the runs; its
  memory the peak of any one program, plus ``held`` bytes (the optimizer state, alive
  but not an argument) during all but the last."""
  fn: Callable[[Any, Any], tuple[Any, dict]]
  programs: tuple[CompiledStep, ...]
  runs: tuple[int, ...]
  held: int

  def __call__(self, state: Any, batch: Any) -> tuple[Any, dict]:
    return self.fn(state, batch)

  def as_text(self) -> str:
    return "\n".join(p.executable.as_text() for p in self.programs)

  def cost_analysis(self) -> dict[str, float]:
    return {key: sum(runs * cost_of(program, key) for program, runs in programs_of(self))
            for key in ("flops", "bytes accessed")}

  def memory_analysis(self) -> Memory | None:
    memories = [p.memory for p in self.programs]
    if any(m is None for m in memories):
      return None
    held = [self.held] * (len(memories) - 1) + [0]
    peak = max(total_bytes(m) + h for m, h in zip(memories, held))
    busiest = max(memories[:-1], key=total_bytes)  # where the activations are
    arguments = max(busiest.argument_size_in_bytes, busiest.output_size_in_bytes) + self.held
    return Memory(arguments, arguments, peak - arguments,
                  sum(m.generated_code_size_in_bytes for m in memories))


def compile_microbatch_buckets(step: steps.MicrobatchStep, abstract_state: Any,
                               abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
                               counts: Sequence[int], mesh, rules,
                               name: str = "train step",
                               options: Mapping[str, Any] | None = None,
                               memory_of: MemoryOf | None = None) -> MicrobatchSteps:
  """Compiles a `steps.MicrobatchStep`: ``zeros`` and ``apply`` once, ``add`` once per
  ``n`` in ``counts`` (each microbatch then runs through its own count's program). The
  accumulator's gradients take the parameters' shardings, its scalars are replicated;
  ``add`` donates the accumulator, ``apply`` the state. Each with the compiler
  ``options`` (`compiler_options`), its memory read by ``memory_of``."""
  state_sh, batch_sh = shardings_of(abstract_state), shardings_of(dict(abstract_batch))
  params, param_sh = abstract_state.params, state_sh.params
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with sharding.mesh_rules(mesh, rules):
    shapes = jax.eval_shape(step.zeros, params)
  acc_sh = steps.Accumulator(replicated, jax.tree.map(lambda _: replicated, shapes.aux),
                             {m: param_sh[m] for m in shapes.grads}, replicated)
  acc = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     shapes, acc_sh)
  j = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  zeros = _compiled(f"{name}: the empty accumulator", step.zeros, (param_sh,), acc_sh, (),
                    (params,), mesh, rules, MICROBATCH_ADVICE, options, memory_of)
  add = {n: _compiled(f"{name}: one microbatch at bucket {n}",
                      lambda p, a, b, i, n=n: step.add(p, a, b, i, n),
                      (param_sh, acc_sh, batch_sh, replicated), acc_sh, (1,),
                      (params, acc, dict(abstract_batch), j), mesh, rules, MICROBATCH_ADVICE,
                      options, memory_of)
         for n in counts}
  apply = _compiled(f"{name}: the update", step.apply, (state_sh, acc_sh),
                    (state_sh, replicated), (0,), (abstract_state, acc), mesh, rules,
                    MICROBATCH_ADVICE, options, memory_of)
  held = sharding.bytes_per_device(abstract_state.opt_state)
  return MicrobatchSteps(zeros, add, apply, step.microbatches, replicated, held)


def _first_line(e: Exception) -> str:
  """The compiler's message on one line, from its RESOURCE_EXHAUSTED on."""
  text = " ".join(str(e).split())
  return text[text.find("RESOURCE_EXHAUSTED"):][:300]


def cost_of(executable: Any, key: str) -> float:
  """One figure of XLA's cost analysis of one call, e.g. "flops" or "bytes accessed" (0
  if unavailable)."""
  try:
    cost = executable.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get(key, 0.0))


def flops_of(executable: Any) -> float:
  """FLOPs of one call per XLA's cost analysis (0 if unavailable)."""
  return cost_of(executable, "flops")


def programs_of(executable: Any) -> tuple[tuple[Any, int], ...]:
  """The compiled programs one call of ``executable`` runs, each with how many times:
  itself once, or for a step composed of several (`MicrobatchSteps.every_microbatch_at`)
  each of its programs with its runs."""
  if isinstance(executable, _Composed):
    return tuple((p.executable, r) for p, r in zip(executable.programs, executable.runs))
  return ((executable, 1),)


def total_bytes(memory: Memory | None) -> float | None:
  """Per-device bytes a compiled step holds at its peak: the compiler's own total where
  it counts one (libtpu's), else the arguments (donated into the outputs, so not counted
  twice) plus the temporaries; None if the compiler gave no analysis."""
  if memory is None:
    return None
  if memory.total_in_bytes is not None:
    return memory.total_in_bytes
  return (max(memory.argument_size_in_bytes, memory.output_size_in_bytes)
          + memory.temp_size_in_bytes)


def log_compiled(what: str, step: CompiledStep) -> None:
  mem, mib = step.memory, lambda b: b / 2**20
  if mem is None:
    logging.info("compiled %s in %.1fs: %.3g GFLOP/step", what, step.compile_seconds,
                 step.flops / 1e9)
    return
  logging.info("compiled %s in %.1fs: %.3g GFLOP/step; memory per device: arguments "
               "%.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, code %.1f MiB",
               what, step.compile_seconds, step.flops / 1e9, mib(mem.argument_size_in_bytes),
               mib(mem.output_size_in_bytes), mib(mem.temp_size_in_bytes),
               mib(mem.generated_code_size_in_bytes))
