"""The train state, the jitted train step, and its ahead-of-time compilation per bucket."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging

from tokenflex_jax import sharding
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.training import checkpointing
from tokenflex_jax.training.loss import answer_loss

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def freeze(params: Mapping[str, Any], frozen: Sequence[str]) -> dict[str, Any]:
  """Stops gradients through frozen module groups, so XLA skips their backward pass."""
  return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


def make_vlm_train_step(model: VLM, tx: optax.GradientTransformation,
                        schedule: optax.Schedule, weighting: str,
                        frozen: Sequence[str]) -> Callable[..., tuple[TrainState, dict]]:
  """(state, batch, num_tokens) -> (state, metrics).

  batch: {"image": [B, H, W, 3] f32, "tokens": [B, T] i32, "loss_mask": [B, T] f32}.
  """
  def loss_fn(params, batch, num_tokens):
    logits = model.apply({"params": freeze(params, frozen)}, batch["image"], batch["tokens"],
                         num_tokens)
    return answer_loss(logits, batch["tokens"], batch["loss_mask"], weighting)

  def train_step(state: TrainState, batch: Batch, num_tokens: int):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, num_tokens)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def init_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """A fresh state from ``init_params(rng)`` (boxed params keep their logical names)."""
  params = init_params(rng)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(nn.unbox(params)))


def state_shardings(abstract_boxed_state: TrainState, mesh, rules) -> TrainState:
  """Shardings for every leaf of the state, derived from the params' logical names.

  Optimizer moments mirror the parameter tree, so each moment takes the sharding of
  the parameter at the same path suffix; scalars are replicated.
  """
  param_sh = sharding.logical_shardings(abstract_boxed_state.params, mesh, rules)
  flat_params = {path: sh for path, sh in
                 jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def moment_sharding(path, leaf):
    for start in range(len(path)):
      if tuple(path[start:]) in flat_params:
        candidate = flat_params[tuple(path[start:])]
        if len(candidate.spec) <= leaf.ndim:
          return candidate
    return replicated

  opt_sh = jax.tree_util.tree_map_with_path(moment_sharding, abstract_boxed_state.opt_state)
  return TrainState(replicated, param_sh, opt_sh)


def compile_per_bucket(step_fn: Callable, abstract_state: TrainState, state_sh: TrainState,
                       abstract_batch: Batch, batch_sh: Mapping[str, Any],
                       counts: Sequence[int], mesh, rules,
                       what: str = "train step, {n} visual tokens",
                       timings: dict[int, float] | None = None) -> dict[int, Any]:
  """Lowers and compiles ``step_fn`` once per token count; logs cost and memory.

  Returns {num_tokens: compiled executable (state, batch) -> (state, metrics)}; records
  each compile's seconds in ``timings`` if given.
  """
  compiled = {}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for n in counts:
    t0 = time.perf_counter()
    jitted = jax.jit(lambda s, b, n=n: step_fn(s, b, n), in_shardings=(state_sh, dict(batch_sh)),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with sharding.mesh_rules(mesh, rules):
      compiled[n] = jitted.lower(abstract_state, abstract_batch).compile()
    seconds = time.perf_counter() - t0
    log_compiled(what.format(n=n), compiled[n], seconds)
    if timings is not None:
      timings[n] = seconds
  return compiled


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one call per XLA's cost analysis (0 if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def log_compiled(what: str, compiled: Any, seconds: float) -> None:
  mem = compiled.memory_analysis()
  mib = lambda b: b / 2**20
  if mem is not None:
    logging.info("compiled %s in %.1fs: %.3g GFLOP/step; memory per device: arguments "
                 "%.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, code %.1f MiB",
                 what, seconds, compiled_flops(compiled) / 1e9,
                 mib(mem.argument_size_in_bytes), mib(mem.output_size_in_bytes),
                 mib(mem.temp_size_in_bytes), mib(mem.generated_code_size_in_bytes))
  else:
    logging.info("compiled %s in %.1fs: %.3g GFLOP/step", what, seconds,
                 compiled_flops(compiled) / 1e9)


def abstract_state_and_shardings(init_params: Callable[[jax.Array], Any],
                                 tx: optax.GradientTransformation, rng: jax.Array, mesh, rules
                                 ) -> tuple[TrainState, TrainState]:
  """(abstract state with shardings, state shardings), from shapes only (call under
  ``sharding.mesh_rules``)."""
  boxed = jax.eval_shape(lambda r: init_state(init_params, tx, r), rng)
  state_sh = state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          sharding.strip_boxes(boxed), state_sh)
  return abstract, state_sh


def fresh_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                rng: jax.Array, state_sh: TrainState) -> TrainState:
  """A randomly initialised state, created directly in its shardings."""
  return jax.jit(lambda r: nn.unbox(init_state(init_params, tx, r)), out_shardings=state_sh)(rng)


def initialize_state(*, init_params: Callable[[jax.Array], Any],
                     tx: optax.GradientTransformation, rng: jax.Array, mesh, rules,
                     manager: Any, data_iterator_from: Callable[[int], Any],
                     initial_params: Callable[[Any], Any | None] = lambda abstract: None,
                     ) -> tuple[TrainState, TrainState, int, Any]:
  """Resumes from the workdir's latest checkpoint, or creates a sharded fresh state.

  Args:
    init_params: rng -> boxed params (e.g. ``lambda r: model.init(r, ...)["params"]``).
    data_iterator_from: global batch index -> the host's data iterator starting there.
    initial_params: for a fresh run, given the abstract (sharded) params, returns
      params to start from (e.g. loaded from another workdir) or None for random init.
  Returns:
    (state, state shardings, step to start from, data iterator positioned for it). The
    iterator's state comes from the checkpoint when it has one for this process layout,
    else (a checkpoint written by another number of processes) from the step.
  """
  data_iterator = data_iterator_from(0)
  with sharding.mesh_rules(mesh, rules):
    abstract, state_sh = abstract_state_and_shardings(init_params, tx, rng, mesh, rules)
    latest = manager.latest_step()
    if latest is not None:
      params, opt_state, _, data_restored = checkpointing.restore(
          manager, latest, abstract.params, abstract.opt_state, data_iterator)
      if not data_restored:
        data_iterator = data_iterator_from(latest)
      logging.info("resumed from %s at step %d", manager.directory, latest)
      state = TrainState(jnp.asarray(latest, jnp.int32), params, opt_state)
      return state, state_sh, latest, data_iterator
    state = fresh_state(init_params, tx, rng, state_sh)
    loaded = initial_params(abstract.params)
    if loaded is not None:
      params = _merge(state.params, loaded)
      opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
      state = TrainState(state.step, params, opt_state)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("initialised a fresh state: %.3fM parameters", n_params / 1e6)
  return state, state_sh, 0, data_iterator


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
  """Replaces the top-level modules of ``base`` that ``override`` provides."""
  return {k: override.get(k, v) for k, v in base.items()}

