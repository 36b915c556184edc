"""Which visual-token budget a training step uses.

The draw is a pure function of (seed, step): every host computes the same bucket for
the same step without communicating, and a resumed run continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokenflex_jax.models.projector import token_side


def validate_buckets(counts: Sequence[int], probs: Sequence[float]) -> None:
  """Raises ValueError naming the config field if counts/probs are unusable."""
  if not counts:
    raise ValueError("config.token_counts is empty")
  if len(set(counts)) != len(counts):
    raise ValueError(f"config.token_counts has duplicates: {tuple(counts)}")
  for n in counts:
    try:
      token_side(n)
    except ValueError as e:
      raise ValueError(f"config.token_counts: {e}") from None
  if len(probs) != len(counts):
    raise ValueError(f"config.token_probs has {len(probs)} entries but config.token_counts "
                     f"has {len(counts)}")
  if any(p < 0 for p in probs) or not np.isclose(sum(probs), 1.0, atol=1e-6):
    raise ValueError(f"config.token_probs must be non-negative and sum to 1, got {tuple(probs)}")


def token_count_for_step(seed: int, step: int, counts: Sequence[int],
                         probs: Sequence[float]) -> int:
  """The visual-token count of ``step``, drawn with ``probs`` from ``counts``."""
  if len(counts) == 1:
    return int(counts[0])
  u = np.random.default_rng([seed, 0x70CE, step]).random()
  index = int(np.searchsorted(np.cumsum(probs), u, side="right"))
  return int(counts[min(index, len(counts) - 1)])
