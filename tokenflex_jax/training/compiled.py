"""Ahead-of-time compilation of a step once per token-count bucket, with its cost report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
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
      lowered = jitted.lower(abstract_state, dict(abstract_batch))
    try:
      executable = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise errors.ConfigError(
          f"the {name} at bucket {n} does not fit a device's memory "
          f"({_first_line(e)}): keep less for the backward pass "
          "(config.model.remat_policy=dots or full), shard over more devices or lower "
          "config.batch_size") from None
    out[n] = CompiledStep(executable, time.perf_counter() - t0, flops_of(executable),
                          executable.memory_analysis())
    log_compiled(f"{name} at bucket {n}", out[n])
  return out


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
