"""Which visual-token budget a training step uses.

The draw is a pure function of (seed, step): every host computes the same bucket for
the same step without communicating, and a resumed run continues the same sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tokenflex_jax import errors
from tokenflex_jax.models.projector import token_side
from tokenflex_jax.specs import RunSpec


def check_counts(counts: Sequence[int], field: str = "config.token_counts",
                 grid_side: int | None = None,
                 grid_fields: str = "config.model.vit.image_size / patch_size") -> None:
  """Raises `errors.ConfigError` naming ``field`` unless ``counts`` are distinct positive
  squares, each pooled from at most the ViT's ``grid_side`` x ``grid_side`` patch grid
  (more visual tokens than patches would only upsample; ``grid_fields`` says where the
  grid comes from). ``grid_side`` None: the grid is not checked."""
  if not counts:
    raise errors.ConfigError(f"{field} is empty")
  if len(set(counts)) != len(counts):
    raise errors.ConfigError(f"{field} has duplicates: {tuple(counts)}")
  for n in counts:
    try:
      side = token_side(n)
    except ValueError as e:
      raise errors.ConfigError(f"{field}: {e}") from None
    if grid_side is not None and side > grid_side:
      raise errors.ConfigError(
          f"{field}={tuple(counts)}: {n} visual tokens need a {side}x{side} pool, larger "
          f"than the ViT's {grid_side}x{grid_side} patch grid ({grid_fields})")


def check_probs(counts: Sequence[int], probs: Sequence[float]) -> None:
  """Raises `errors.ConfigError` naming ``config.token_probs`` unless it has one
  non-negative entry per count (none to check without counts) and sums to 1."""
  if counts and len(probs) != len(counts):
    raise errors.ConfigError(f"config.token_probs has {len(probs)} entries but "
                             f"config.token_counts has {len(counts)}")
  if counts and (any(p < 0 for p in probs) or not np.isclose(sum(probs), 1.0, atol=1e-6)):
    raise errors.ConfigError(f"config.token_probs must be non-negative and sum to 1, got "
                             f"{tuple(probs)}")


def validate_buckets(counts: Sequence[int], probs: Sequence[float]) -> None:
  """Raises `errors.ConfigError` (a ValueError) naming the config field if counts/probs
  are unusable (`check_counts`, `check_probs`)."""
  check_counts(counts, "config.token_counts")
  check_probs(counts, probs)


def token_count_for_step(seed: int, step: int, counts: Sequence[int],
                         probs: Sequence[float]) -> int:
  """The visual-token count of ``step``, drawn with ``probs`` from ``counts``."""
  if len(counts) == 1:
    return int(counts[0])
  u = np.random.default_rng([seed, 0x70CE, step]).random()
  index = int(np.searchsorted(np.cumsum(probs), u, side="right"))
  return int(counts[min(index, len(counts) - 1)])


@dataclasses.dataclass(frozen=True)
class Buckets:
  """The visual-token budgets a training run draws from: ``counts`` with ``probs``, one
  per step by a pure function of (``seed``, step) (`token_count_for_step`). Validated
  when made (`validate_buckets`); `config_checks` also checks the counts against the ViT's
  patch grid."""
  counts: tuple[int, ...]
  probs: tuple[float, ...]
  seed: int = 0

  def __post_init__(self):
    validate_buckets(self.counts, self.probs)

  @classmethod
  def of(cls, config: RunSpec) -> "Buckets":
    """``config.token_counts`` / ``token_probs`` / ``seed``."""
    return cls(tuple(config.token_counts), tuple(config.token_probs), config.seed)

  @classmethod
  def single(cls, count: int) -> "Buckets":
    """Every step at ``count``."""
    return cls((count,), (1.0,))

  def for_step(self, step: int) -> int:
    """The count of training step ``step`` (every host draws the same)."""
    return token_count_for_step(self.seed, step, self.counts, self.probs)

  def for_microbatches(self, step: int, microbatches: int) -> tuple[int, ...]:
    """The counts of the ``microbatches`` microbatches of training step ``step`` (every
    host draws the same): microbatch j of step s draws as step s * k + j would, so the
    sequence of microbatch counts is that of the steps of a run with k times the steps."""
    return tuple(self.for_step(step * microbatches + j) for j in range(microbatches))
