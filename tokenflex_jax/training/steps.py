"""The train state and the generic train step built from a loss function.

A loss function ``(params, batch, num_tokens) -> (scalar loss, {name: metric})`` is all
a kind of training brings (the VLM's answer loss, the ViT's patch-label loss); the
step, its optimizer update and its metrics are the same for every kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tokenflex_jax import sharding
from tokenflex_jax.training.optimizer import Optimizer

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, int], tuple[jax.Array, dict[str, jax.Array]]]
# The aux entry a loss function reports its normaliser in (the loss is a weighted sum
# over the batch divided by it), so that microbatches' gradients add up to the whole
# batch's; without it every microbatch weighs the same.
LOSS_WEIGHT = "loss_weight"
# Aux metrics that are counts over the batch: summed over microbatches.
COUNTS = frozenset({"answer_tokens", "useful_positions", "patches", "object_patches"})
# Aux metrics that are shares of one of the `COUNTS` (metric: its denominator): averaged
# over microbatches weighted by that count, so they equal the whole batch's. The rest are
# averaged weighted like the loss.
RATIOS = {"token_accuracy": "answer_tokens", "color_accuracy": "patches",
          "object_recall": "object_patches"}
InitParams = Callable[[jax.Array], Any]  # rng -> params boxed with their logical axes


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # [] int32: completed steps
  params: Any
  opt_state: Any


def freeze(params: Mapping[str, Any], frozen: Sequence[str]) -> dict[str, Any]:
  """Stops gradients through frozen module groups, so XLA skips their backward pass."""
  return {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}


class Accumulator(NamedTuple):
  """A step's microbatches so far, each weighted by its loss normaliser: loss [] and aux
  {name: []} (`COUNTS` summed, `RATIOS` weighted by their count), grads {module: subtree} of the trainable
  modules only (a frozen module's are zeros: not carried), weight [] (the normalisers'
  sum)."""
  loss: jax.Array
  aux: dict[str, jax.Array]
  grads: dict[str, Any]
  weight: jax.Array


def _value_and_grad(loss_fn: LossFn, optimizer: Optimizer):
  """(params, batch, num_tokens) -> (loss [], aux {name: []} without the weight, grads
  shaped like params, weight [])."""
  def value_and_grad(params, batch, num_tokens):
    frozen_loss = lambda p: loss_fn(freeze(p, optimizer.frozen), batch, num_tokens)
    (loss, aux), grads = jax.value_and_grad(frozen_loss, has_aux=True)(params)
    aux = dict(aux)
    weight = aux.pop(LOSS_WEIGHT, jnp.ones((), jnp.float32))
    return loss, aux, grads, weight
  return value_and_grad


def _microbatch_value_and_grad(loss_fn: LossFn, optimizer: Optimizer, k: int):
  """(params, global batch, j, num_tokens) -> one microbatch's `Accumulator` terms, unweighted:
  (loss, aux, the trainable modules' grads, weight)."""
  value_and_grad = _value_and_grad(loss_fn, optimizer)

  def one(params, batch, j, num_tokens):
    loss, aux, grads, weight = value_and_grad(params, microbatch(batch, j, k), num_tokens)
    return loss, aux, {m: g for m, g in grads.items() if m not in optimizer.frozen}, weight
  return one


def _empty(shapes: tuple) -> Accumulator:
  """The zero `Accumulator` for one microbatch's terms' ``shapes`` (`jax.eval_shape`)."""
  return Accumulator(*jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def _accumulate(acc: Accumulator, loss, aux, grads, weight) -> Accumulator:
  """``acc`` plus one microbatch, weighted by its loss normaliser (`COUNTS` summed,
  `RATIOS` weighted by their count)."""
  add = lambda total, x: total + weight * x
  aux = {k: acc.aux[k] + v if k in COUNTS
         else acc.aux[k] + aux[RATIOS[k]] * v if k in RATIOS and RATIOS[k] in aux
         else add(acc.aux[k], v) for k, v in aux.items()}
  return Accumulator(add(acc.loss, loss), aux, jax.tree.map(add, acc.grads, grads),
                     acc.weight + weight)


def _averaged(acc: Accumulator, params: Any):
  """(loss, aux, grads shaped like ``params``) of the whole batch from its microbatches'
  weighted sums; the frozen modules' gradients zeros."""
  total = acc.weight
  aux = {k: v if k in COUNTS
         else v / jnp.maximum(acc.aux[RATIOS[k]], 1.0) if k in RATIOS and RATIOS[k] in acc.aux
         else v / total for k, v in acc.aux.items()}
  grads = {m: jax.tree.map(lambda g: g / total, acc.grads[m]) if m in acc.grads
           else jax.tree.map(jnp.zeros_like, sub) for m, sub in params.items()}
  return acc.loss / total, aux, grads


def _update(optimizer: Optimizer, state: TrainState, loss, aux, grads
            ) -> tuple[TrainState, dict]:
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "learning_rate": optimizer.schedule(state.step), **aux}
  return TrainState(state.step + 1, params, opt_state), metrics


def microbatch(batch: Batch, j: jax.Array | int, k: int) -> Batch:
  """Microbatch ``j`` of ``k`` of a global batch [B, ...]: rows j, j + k, ... [B / k, ...]
  (so each spans every data-parallel device); ``j`` may be traced."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
      x.reshape(x.shape[0] // k, k, *x.shape[1:]), j, axis=1, keepdims=False), dict(batch))


def make_train_step(loss_fn: LossFn, optimizer: Optimizer, microbatches: int = 1
                    ) -> Callable[[TrainState, Batch, int], tuple[TrainState, dict]]:
  """(state, batch, num_tokens) -> (state, metrics): one optimizer step on ``loss_fn``.

  With ``microbatches`` k > 1 the global batch [B, ...] is split into k microbatches of
  B / k rows (`microbatch`), run one after another (`jax.lax.scan`: one microbatch's
  activations at a time) and their gradients accumulated (`Accumulator`), each weighted
  by its loss normaliser (aux `LOSS_WEIGHT`) over the batch's: the step equals the whole
  batch's, the per-sample sqrt weighting included (normalising each microbatch on its own
  would not).

  Metrics: the loss, the gradient's global norm, the base learning rate and the loss
  function's own metrics (over microbatches: `COUNTS` summed, `RATIOS` weighted by their
  count, the rest weighted like the loss).
  """
  value_and_grad = _value_and_grad(loss_fn, optimizer)
  one = _microbatch_value_and_grad(loss_fn, optimizer, microbatches)

  def accumulated(params, batch, num_tokens):
    zeros = _empty(jax.eval_shape(lambda: one(params, batch, 0, num_tokens)))
    body = lambda acc, j: (_accumulate(acc, *one(params, batch, j, num_tokens)), None)
    acc, _ = jax.lax.scan(body, zeros, jnp.arange(microbatches))
    return _averaged(acc, params)

  def train_step(state: TrainState, batch: Batch, num_tokens: int):
    if microbatches == 1:
      loss, aux, grads, _ = value_and_grad(state.params, batch, num_tokens)
    else:
      loss, aux, grads = accumulated(state.params, batch, num_tokens)
    return _update(optimizer, state, loss, aux, grads)

  return train_step


@dataclasses.dataclass(frozen=True)
class MicrobatchStep:
  """A step whose k microbatches may each run at their own visual-token count
  (``config.count_per_microbatch``), as pieces to compile separately, so that each
  microbatch runs through its own count's compiled forward and backward (batch: the
  global batch [B, ...]; acc: an `Accumulator`):

  zeros(params) -> the empty accumulator (only the params' shapes matter);
  add(params, acc, batch, j, num_tokens) -> ``acc`` plus microbatch ``j`` [B / k, ...]
    (`microbatch`) at ``num_tokens`` visual tokens, weighted by its loss normaliser;
  apply(state, acc) -> (state, metrics): the update of the whole batch, as
    `make_train_step`'s.
  With every microbatch at one count this is `make_train_step`'s step.
  """
  zeros: Callable[[Any], Accumulator]
  add: Callable[[Any, Accumulator, Batch, jax.Array, int], Accumulator]
  apply: Callable[[TrainState, Accumulator], tuple[TrainState, dict]]
  microbatches: int


def make_microbatch_step(loss_fn: LossFn, optimizer: Optimizer, microbatches: int,
                         batch_shapes: Batch, num_tokens: int) -> MicrobatchStep:
  """`MicrobatchStep` of ``loss_fn``; ``batch_shapes`` (the global batch's
  `jax.ShapeDtypeStruct`s) and any one ``num_tokens`` give the accumulator's structure
  (the same at every count)."""
  one = _microbatch_value_and_grad(loss_fn, optimizer, microbatches)

  def zeros(params):
    return _empty(jax.eval_shape(lambda p, b: one(p, b, 0, num_tokens), params,
                                 dict(batch_shapes)))

  def add(params, acc, batch, j, n):
    return _accumulate(acc, *one(params, batch, j, n))

  def apply(state, acc):
    return _update(optimizer, state, *_averaged(acc, state.params))

  return MicrobatchStep(zeros, add, apply, microbatches)


def boxed_params(init_params: InitParams, mesh, rules) -> Any:
  """The parameter shapes ``init_params`` makes, still boxed with their logical axes
  (`jax.ShapeDtypeStruct`s; nothing is allocated)."""
  key = jax.random.key(0)  # Outside the mesh: a mesh of devices compiled for (a TPU
  with sharding.mesh_rules(mesh, rules):  # topology from a CPU host) cannot hold it.
    return jax.eval_shape(init_params, key)


def abstract_params(init_params: InitParams, mesh, rules) -> Any:
  """The parameters ``init_params`` makes as `jax.ShapeDtypeStruct`s carrying the
  shardings their logical axes get from ``rules`` on ``mesh`` (nothing is allocated):
  what a checkpoint is restored onto, or converted weights are laid out by."""
  boxed = boxed_params(init_params, mesh, rules)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      sharding.strip_boxes(boxed), shardings)


def _boxed_state(init_params: InitParams, tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
  params = init_params(rng)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(nn.unbox(params)))


def state_shardings(boxed: Any, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
  """Shardings of every leaf of the state, derived from the params' logical axes
  (``boxed``, from `boxed_params`): the optimizer state's through optax's own parameter
  mapping, the step replicated. Raises if a large parameter ends up unsharded on a mesh
  that could shard it."""
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  sharding.assert_params_sufficiently_sharded(boxed, param_sh, mesh, rules)
  opt_sh = sharding.opt_state_shardings(tx, boxed, param_sh, mesh)
  return TrainState(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), param_sh,
                    opt_sh)


def abstract_state(params: Any, tx: optax.GradientTransformation,
                   state_sh: TrainState) -> TrainState:
  """The state's shapes for the unboxed parameter shapes ``params``, each
  `jax.ShapeDtypeStruct` carrying its sharding."""
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                      jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, state_sh)


def random_state(init_params: InitParams, tx: optax.GradientTransformation, rng: jax.Array,
                 state_sh: TrainState, mesh, rules) -> TrainState:
  """A randomly initialised state, created directly in its shardings."""
  with sharding.mesh_rules(mesh, rules):
    return jax.jit(lambda r: nn.unbox(_boxed_state(init_params, tx, r)),
                   out_shardings=state_sh)(rng)


def with_params(state: TrainState, params: Mapping[str, Any],
                optimizer: Optimizer, state_sh: TrainState) -> TrainState:
  """``state`` with the top-level modules that ``params`` provides replaced, and a
  fresh optimizer state for them."""
  merged = {k: params.get(k, v) for k, v in state.params.items()}
  opt_state = jax.jit(optimizer.tx.init, out_shardings=state_sh.opt_state)(merged)
  return TrainState(state.step, merged, opt_state)
