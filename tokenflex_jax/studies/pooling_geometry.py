"""Which questions of the budget-graded families survive pooling, from geometry alone.

A ``tiles`` or ``marks`` question asks the colour of the top-left mark of a 2x2 block
(`scenes._mark_block`), a ``stripes`` question the left one of four stripes
(`scenes._stripes`). Each visual token averages the patches of its pooling window, so
the mark's colour survives at a count when some token is mostly (> 50% of its weight)
that mark; otherwise every token that sees it mixes it with its neighbours or the
background. The share of solvable questions is exact: it enumerates every size and
anchor the generator draws (all equally likely).
"""

from __future__ import annotations

import numpy as np

from tokenflex_jax.data import scenes
from tokenflex_jax.models.projector import pooling_matrix, token_side

GRADED_SIDES = {"tiles": scenes.TILE_SIDES, "marks": scenes.MARK_SIDES,
                "stripes": scenes.STRIPE_WIDTHS}


def pixel_weights(num_tokens: int, mode: str, patch_size: int = 2) -> np.ndarray:
  """[n, BASE_SIZE]: weight of each base pixel in each token row (or column) of an n x n
  pooling, through patches of ``patch_size`` base pixels."""
  grid = scenes.BASE_SIZE // patch_size
  to_patch = np.kron(np.eye(grid), np.full((1, patch_size), 1.0 / patch_size))
  return pooling_matrix(grid, token_side(num_tokens), mode) @ to_patch


def solvable(side: int, y0: int, x0: int, num_tokens: int, mode: str,
             height: int | None = None) -> bool:
  """True when some token is more than half the mark at (y0, x0): ``side`` wide and
  ``height`` (default: ``side``) tall."""
  height = side if height is None else height
  w = pixel_weights(num_tokens, mode)
  fy, fx = w[:, y0:y0 + height].sum(1), w[:, x0:x0 + side].sum(1)
  return float(np.outer(fy, fx).max()) > 0.5


def solvable_share(family: str, num_tokens: int, mode: str = "adaptive_avg") -> float:
  """The share of ``family``'s questions whose answer survives pooling to ``num_tokens``."""
  if family not in GRADED_SIDES:
    raise ValueError(f"{family!r} is not a budget-graded family ({', '.join(GRADED_SIDES)})")
  shares = []
  for side in GRADED_SIDES[family]:
    if family == "stripes":  # any row; columns as `scenes.block_anchors`
      rows, height = scenes.BLOCK_ANCHORS, scenes.STRIPE_HEIGHT
    else:
      rows, height = scenes.block_anchors(side), side
    shares.append(np.mean([solvable(side, y, x, num_tokens, mode, height)
                           for y in rows for x in scenes.block_anchors(side)]))
  return float(np.mean(shares))


def markdown_table(counts: tuple[int, ...] = (64, 100, 144, 196, 256)) -> str:
  """Solvable share (%) per graded family, count and pooling mode, as a markdown table."""
  lines = ["| family | mark widths (px) | pooling | " + " | ".join(f"{n}" for n in counts) + " |",
           "|---|---|---|" + "---|" * len(counts)]
  for family, sides in GRADED_SIDES.items():
    for mode in ("adaptive_avg", "resize_avg"):
      cells = " | ".join(f"{100 * solvable_share(family, n, mode):.0f}" for n in counts)
      lines.append(f"| {family} | {', '.join(map(str, sides))} | {mode} | {cells} |")
  return "\n".join(lines)
