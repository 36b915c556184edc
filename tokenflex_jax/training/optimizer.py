"""AdamW with warmup + cosine, global-norm clipping, weight-decay mask, module groups.

Each top-level module of the parameter tree (vit, projector, llm, ...) is a group with
a learning-rate multiplier; multiplier 0 freezes the group (no optimizer moments are
kept for it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from tokenflex_jax import errors
from tokenflex_jax.specs import OptimizerSpec, RunSpec


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The run's optimizer: the transformation, its base learning-rate schedule (for the
  logs) and the module groups it freezes (no backward pass through them)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  frozen: tuple[str, ...]


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end_fraction: float) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_fraction)


def warmup_warning(opt_config: Any, total_steps: int) -> str | None:
  """A warning when the run ends inside its warmup, so the learning rate never reaches
  ``config.optimizer.learning_rate``; None otherwise."""
  if total_steps >= opt_config.warmup_steps:
    return None
  schedule = learning_rate_schedule(opt_config.learning_rate, opt_config.warmup_steps,
                                    total_steps, opt_config.end_lr_fraction)
  last = float(schedule(max(total_steps - 1, 0)))
  return (f"config.total_steps={total_steps} ends inside the warmup (config.optimizer."
          f"warmup_steps={opt_config.warmup_steps}): the learning rate peaks at {last:.3g}, "
          f"not {opt_config.learning_rate:.3g}; lower the warmup to train at the peak")


def check_multipliers(modules: Iterable[str], multipliers: Mapping[str, float]) -> None:
  """Raises `errors.ConfigError` unless ``config.lr_multipliers`` has one entry, >= 0,
  for each of the model's top-level ``modules`` and no other."""
  modules = set(modules)
  unknown = set(multipliers) - modules
  if unknown:
    raise errors.ConfigError(f"config.lr_multipliers names {sorted(unknown)}, but the "
                             f"model's modules are {sorted(modules)}")
  missing = modules - set(multipliers)
  if missing:
    raise errors.ConfigError(f"config.lr_multipliers has no entry for modules "
                             f"{sorted(missing)}")
  for name, m in multipliers.items():
    if not m >= 0:
      raise errors.ConfigError(f"config.lr_multipliers.{name}={m} must be >= 0 (0 freezes "
                               "the module)")


def check_optimizer(opt_config: OptimizerSpec) -> None:
  """Raises `errors.ConfigError` naming the ``config.optimizer`` field that cannot work:
  a learning rate <= 0 (freeze a module with a multiplier of 0 instead), a negative
  warmup, end fraction or weight decay, a clip norm <= 0, betas outside [0, 1), an
  unknown ``mu_dtype``."""
  o = opt_config
  if not o.learning_rate > 0:
    raise errors.ConfigError(f"config.optimizer.learning_rate={o.learning_rate} must be "
                             "positive (config.lr_multipliers.MODULE=0 freezes a module)")
  for name in ("warmup_steps", "end_lr_fraction", "weight_decay"):
    if not getattr(o, name) >= 0:
      raise errors.ConfigError(f"config.optimizer.{name}={getattr(o, name)} must be >= 0")
  if not o.clip_norm > 0:
    raise errors.ConfigError(f"config.optimizer.clip_norm={o.clip_norm} must be positive")
  for name in ("b1", "b2"):
    if not 0 <= getattr(o, name) < 1:
      raise errors.ConfigError(f"config.optimizer.{name}={getattr(o, name)} must be in [0, 1)")
  moment_dtype(o.mu_dtype)


def group_labels(params: Mapping[str, Any], multipliers: Mapping[str, float]) -> Any:
  """Labels every leaf with its top-level module name, or "frozen"."""
  check_multipliers(params, multipliers)
  return {name: jax.tree.map(lambda _, n=name: n if multipliers[n] > 0 else "frozen", sub)
          for name, sub in params.items()}


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and kernels only; not on norms, biases (of any rank, e.g.
  the attention's [heads, head_dim] q/k/v biases) or embeddings."""
  def keep(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    return (leaf.ndim >= 2 and names[-1] not in ("bias", "scale")
            and "embedding" not in names and "pos_embedding" not in names)
  return jax.tree_util.tree_map_with_path(keep, params)


MU_DTYPES = ("float32", "bfloat16")


def moment_dtype(name: str) -> Any:
  """``config.optimizer.mu_dtype`` -> the dtype of Adam's first moment (the second
  moment and the parameters stay float32)."""
  if name not in MU_DTYPES:
    raise errors.ConfigError(f"config.optimizer.mu_dtype must be one of {MU_DTYPES}, "
                             f"got {name!r}")
  return jnp.dtype(name)


def make_optimizer(opt_config: Any, multipliers: Mapping[str, float], total_steps: int,
                   params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, base learning-rate schedule)."""
  schedule = learning_rate_schedule(opt_config.learning_rate, opt_config.warmup_steps,
                                    total_steps, opt_config.end_lr_fraction)
  transforms = {"frozen": optax.set_to_zero()}
  for name, mult in multipliers.items():
    if mult > 0:
      transforms[name] = optax.adamw(
          lambda step, m=mult: schedule(step) * m, b1=opt_config.b1, b2=opt_config.b2,
          weight_decay=opt_config.weight_decay, mask=decay_mask,
          mu_dtype=moment_dtype(opt_config.mu_dtype))
  tx = optax.chain(optax.clip_by_global_norm(opt_config.clip_norm),
                   optax.multi_transform(transforms, group_labels(params, multipliers)))
  return tx, schedule


def from_config(config: RunSpec, abstract_params: Mapping[str, Any]
                ) -> Optimizer:
  """``config.optimizer`` with ``config.lr_multipliers`` (one per top-level module of
  ``abstract_params``, 0 freezing it) over ``config.total_steps``."""
  multipliers = {k: float(v) for k, v in config.lr_multipliers.items()}
  tx, schedule = make_optimizer(config.optimizer, multipliers, config.total_steps,
                                abstract_params)
  frozen = tuple(k for k, m in multipliers.items() if m == 0)
  logging.info("learning-rate multipliers %s; frozen: %s", multipliers, frozen or "none")
  return Optimizer(tx, schedule, frozen)
