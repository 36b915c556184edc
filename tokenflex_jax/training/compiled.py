"""Ahead-of-time compilation of a step once per token-count bucket, with its cost report."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from tokenflex_jax import errors, sharding


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """One bucket's executable ``(state, batch) -> (state, metrics)`` and what it costs."""
  executable: Any          # jax.stages.Compiled
  compile_seconds: float
  flops: float             # per call, per XLA's cost analysis (0 if unavailable)
  memory: Any              # executable.memory_analysis(), per device (None if unavailable)

  def __call__(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
    return self.executable(state, batch)


def shardings_of(abstract: Any) -> Any:
  """The ``.sharding`` of every leaf of a tree of `jax.ShapeDtypeStruct`s."""
  return jax.tree.map(lambda x: x.sharding, abstract)


def compile_buckets(step_fn: Callable[[Any, Any, int], tuple[Any, dict]], abstract_state: Any,
                    abstract_batch: Mapping[str, jax.ShapeDtypeStruct], counts: Sequence[int],
                    mesh, rules, name: str = "train step") -> dict[int, CompiledStep]:
  """Lowers and compiles ``step_fn(state, batch, n)`` once per ``n`` in ``counts``.

  The state and batch are abstract (`jax.ShapeDtypeStruct` with shardings); the state
  is donated and comes back in its own shardings, the metrics replicated. Logs each
  bucket's FLOPs and per-device memory. Returns {n: CompiledStep}.
  """
  state_sh, batch_sh = shardings_of(abstract_state), shardings_of(dict(abstract_batch))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = {}
  for n in counts:
    t0 = time.perf_counter()
    jitted = jax.jit(lambda s, b, n=n: step_fn(s, b, n), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with sharding.mesh_rules(mesh, rules):
      executable = _compile(jitted.lower(abstract_state, dict(abstract_batch)),
                            f"{name} at bucket {n}")
    out[n] = CompiledStep(executable, time.perf_counter() - t0, flops_of(executable),
                          executable.memory_analysis())
    log_compiled(f"{name} at bucket {n}", out[n])
  return out


@dataclasses.dataclass(frozen=True)
class MicrobatchSteps(Mapping):
  """The compiled pieces of a `steps.MicrobatchStep` (one ``add`` per bucket), as the
  step of each draw: {(count of microbatch 0, ..., of microbatch k-1): (state, batch) ->
  (state, metrics)}, every tuple of the buckets' counts a key."""
  zeros: CompiledStep             # params -> accumulator
  add: dict[int, CompiledStep]    # count -> (params, acc, batch, j) -> acc
  apply: CompiledStep             # (state, acc) -> (state, metrics)
  microbatches: int
  held_bytes: int                 # per device, held beside every program: the optimizer state

  def __getitem__(self, counts: tuple[int, ...]) -> Callable[[Any, Any], tuple[Any, dict]]:
    if len(counts) != self.microbatches or not set(counts) <= set(self.add):
      raise KeyError(counts)

    def step(state, batch):
      acc = self.zeros.executable(state.params)
      for j, n in enumerate(counts):
        acc = self.add[n].executable(state.params, acc, batch, np.int32(j))
      return self.apply(state, acc)
    return step

  def __iter__(self) -> Iterator[tuple[int, ...]]:
    return itertools.product(sorted(self.add), repeat=self.microbatches)

  def __len__(self) -> int:
    return len(self.add) ** self.microbatches

  def every_microbatch_at(self) -> dict[int, CompiledStep]:
    """{count: the step with every microbatch at that count, as one `CompiledStep`}: its
    compile time, FLOPs and costs summed over its programs, its memory their peak."""
    out = {}
    for n, add in self.add.items():
      composed = _Composed(self[(n,) * self.microbatches],
                           (self.zeros,) + (add,) * self.microbatches + (self.apply,),
                           self.held_bytes)
      out[n] = CompiledStep(composed, self.zeros.compile_seconds + add.compile_seconds
                            + self.apply.compile_seconds, flops_of(composed),
                            composed.memory_analysis())
    return out


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes, as a compiled program's ``memory_analysis()`` gives them."""
  argument_size_in_bytes: int
  output_size_in_bytes: int
  temp_size_in_bytes: int
  generated_code_size_in_bytes: int


@dataclasses.dataclass(frozen=True)
class _Composed:
  """A step run as several compiled programs in turn, with a compiled program's
  interface: called as the step; its text and cost summed over the programs (each time
  it runs); its memory the peak of any one program plus ``held`` bytes (arguments of
  other programs that stay alive meanwhile, e.g. the optimizer state during a
  microbatch), as arguments."""
  fn: Callable[[Any, Any], tuple[Any, dict]]
  programs: tuple[CompiledStep, ...]
  held: int

  def __call__(self, state: Any, batch: Any) -> tuple[Any, dict]:
    return self.fn(state, batch)

  def as_text(self) -> str:
    return "\n".join(p.executable.as_text() for p in self.programs)

  def cost_analysis(self) -> dict[str, float]:
    return {key: sum(cost_of(p.executable, key) for p in self.programs)
            for key in ("flops", "bytes accessed")}

  def memory_analysis(self) -> Memory | None:
    if any(p.memory is None for p in self.programs):
      return None
    peak = max(total_bytes(p.memory) + (self.held if p is not self.programs[-1] else 0)
               for p in self.programs)
    first = self.programs[1].memory if len(self.programs) > 1 else self.programs[0].memory
    arguments = max(first.argument_size_in_bytes, first.output_size_in_bytes) + self.held
    return Memory(arguments, arguments, peak - arguments,
                  sum(p.memory.generated_code_size_in_bytes for p in self.programs))


def compile_microbatch_buckets(step: Any, abstract_state: Any,
                               abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
                               counts: Sequence[int], mesh, rules,
                               name: str = "train step") -> MicrobatchSteps:
  """Compiles a `steps.MicrobatchStep`: ``zeros`` and ``apply`` once, ``add`` once per
  ``n`` in ``counts`` (each microbatch then runs through its own count's program). The
  accumulator's gradients take the parameters' shardings, its scalars are replicated;
  the accumulator and the state are donated."""
  state_sh, batch_sh = shardings_of(abstract_state), shardings_of(dict(abstract_batch))
  params, param_sh = abstract_state.params, state_sh.params
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with sharding.mesh_rules(mesh, rules):
    shapes = jax.eval_shape(step.zeros, params)
  acc_sh = (replicated, jax.tree.map(lambda _: replicated, shapes[1]), param_sh, replicated)
  acc = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     shapes, acc_sh)
  j = jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=replicated)

  def compiled(what, fn, in_sh, out_sh, donate, *args):
    t0 = time.perf_counter()
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate)
    with sharding.mesh_rules(mesh, rules):
      executable = _compile(jitted.lower(*args), what)
    out = CompiledStep(executable, time.perf_counter() - t0, flops_of(executable),
                       executable.memory_analysis())
    log_compiled(what, out)
    return out

  zeros = compiled(f"{name}: the empty accumulator", step.zeros, (param_sh,), acc_sh, (),
                   params)
  add = {n: compiled(f"{name}: one microbatch at bucket {n}",
                     lambda p, a, b, i, n=n: step.add(p, a, b, i, n),
                     (param_sh, acc_sh, batch_sh, replicated), acc_sh, (1,),
                     params, acc, dict(abstract_batch), j)
         for n in counts}
  apply = compiled(f"{name}: the update", step.apply, (state_sh, acc_sh),
                   (state_sh, replicated), (0,), abstract_state, acc)
  held = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_state.opt_state))
  return MicrobatchSteps(zeros, add, apply, step.microbatches, held)


def _compile(lowered: Any, what: str) -> Any:
  """``lowered.compile()``, a device too small for it one line naming ``what``."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise errors.ConfigError(
        f"the {what} does not fit a device's memory "
        f"({_first_line(e)}): keep less for the backward pass "
        "(config.model.remat_policy=dots or full), shard over more devices or lower "
        "config.batch_size") from None


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


def total_bytes(memory: Any) -> float | None:
  """Per-device bytes a compiled step holds at its peak, from its ``memory_analysis()``:
  the arguments (donated into the outputs, so not counted twice) plus the temporaries;
  None if the compiler gave no analysis."""
  if memory is None:
    return None
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
