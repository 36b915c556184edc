"""Packing conversations into fixed-shape rows, and what a layout wastes.

A row has a text capacity C (text tokens, the image markers not counted) and K image
slots; at a step of N visual tokens per image it holds C + K * N positions, whatever its
conversations are, so one compiled step per bucket serves every row, and the packing
does not depend on N. A conversation of t text tokens and i images fills t + i * N of
them (its useful positions); the rest is padding.

Two layouts:
- padded (today's training rows): one conversation per row, C = max_text_length - 1
  (the one image marker is a text token replaced by the N visual tokens), K = 1; a
  text-only row still pays for its N visual slots;
- packed: conversations placed by streaming first fit (`FirstFit`) into rows of C text
  tokens and K image slots: each goes into the first open row with room for its text
  and images, else a new row; with more than ``open_rows`` open, the oldest is closed.
  Deterministic in the stream order, so a resumed stream packs the same rows.

A conversation longer than C, or with more images than K, is truncated (counted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Lengths:
  """A conversation's size: text tokens (image markers not counted) and images."""
  text_tokens: int
  images: int


@dataclasses.dataclass(frozen=True)
class RowShape:
  """C text tokens and K image slots per row."""
  text_capacity: int
  image_slots: int

  def positions(self, num_tokens: int) -> int:
    """The row's positions at ``num_tokens`` visual tokens per image: C + K * N."""
    return self.text_capacity + self.image_slots * num_tokens


def padded_shape(max_text_length: int) -> RowShape:
  """Today's row: ``max_text_length`` tokens with one image marker, one image slot."""
  return RowShape(max_text_length - 1, 1)


def balanced_image_slots(conversations: Sequence[Lengths], text_capacity: int) -> int:
  """K for a packed row of ``text_capacity`` text tokens that fills both at once: the
  data's images per text token times the capacity, rounded up (at least 1)."""
  text = sum(c.text_tokens for c in conversations)
  images = sum(c.images for c in conversations)
  return max(1, math.ceil(text_capacity * images / max(text, 1)))


def best_image_slots(conversations: Sequence[Lengths], text_capacity: int,
                     counts: Iterable[int], open_rows: int = 64) -> int:
  """K for a packed row of ``text_capacity`` text tokens with the highest useful share of
  the packed rows' positions, averaged over ``counts`` (`figures`), from
  `balanced_image_slots` up: rows of mixed conversations need a few more slots than the
  mean, as the balance of text and images varies from row to row. Stops at the first K
  that does worse than the one before."""
  counts = tuple(counts)
  score = lambda k: float(np.mean(list(figures(conversations, RowShape(text_capacity, k),
                                               counts, True, open_rows).useful_share.values())))
  best = balanced_image_slots(conversations, text_capacity)
  best_score = score(best)
  while True:
    candidate = score(best + 1)
    if candidate <= best_score:
      return best
    best, best_score = best + 1, candidate


def clip(c: Lengths, shape: RowShape) -> tuple[Lengths, bool]:
  """``c`` cut to fit one row of ``shape``, and whether anything was cut."""
  clipped = Lengths(min(c.text_tokens, shape.text_capacity), min(c.images, shape.image_slots))
  return clipped, clipped != c


@dataclasses.dataclass
class _OpenRow:
  members: list[int]
  text: int = 0
  images: int = 0


class FirstFit:
  """Streaming first-fit packing into rows of ``shape``: `add` a conversation (index,
  lengths already clipped), get back the rows it closed, each a list of indices in the
  order they were added; `finish` closes the rest. At most ``open_rows`` rows stay open
  (bounded memory and a bounded distance between a conversation's place in the stream
  and its row)."""

  def __init__(self, shape: RowShape, open_rows: int = 64):
    if open_rows < 1:
      raise ValueError(f"open_rows must be >= 1, got {open_rows}")
    self._shape, self._limit = shape, open_rows
    self._open: list[_OpenRow] = []

  def add(self, index: int, c: Lengths) -> list[list[int]]:
    for row in self._open:
      if (row.text + c.text_tokens <= self._shape.text_capacity and
          row.images + c.images <= self._shape.image_slots):
        break
    else:
      row = _OpenRow([])
      self._open.append(row)
    row.members.append(index)
    row.text += c.text_tokens
    row.images += c.images
    closed = []
    while len(self._open) > self._limit:
      closed.append(self._open.pop(0).members)
    return closed

  def finish(self) -> list[list[int]]:
    closed, self._open = [row.members for row in self._open], []
    return closed


def pack(conversations: Sequence[Lengths], shape: RowShape, open_rows: int = 64
         ) -> list[list[int]]:
  """The rows (lists of conversation indices) of `FirstFit` over ``conversations``,
  each clipped to ``shape`` first."""
  packer, rows = FirstFit(shape, open_rows), []
  for i, c in enumerate(conversations):
    rows += packer.add(i, clip(c, shape)[0])
  return rows + packer.finish()


@dataclasses.dataclass(frozen=True)
class LayoutFigures:
  """A layout over a set of conversations: rows, conversations per row, the share of
  conversations truncated, and per bucket the useful share of the rows' positions."""
  rows: int
  conversations_per_row: float
  truncated_share: float
  useful_share: dict[int, float]


def figures(conversations: Sequence[Lengths], shape: RowShape, counts: Iterable[int],
            packed: bool, open_rows: int = 64) -> LayoutFigures:
  """`LayoutFigures` of ``conversations`` in rows of ``shape``: packed by `pack`, or one
  per row (``packed=False``)."""
  clipped = [clip(c, shape) for c in conversations]
  kept = [c for c, _ in clipped]
  rows = pack(kept, shape, open_rows) if packed else [[i] for i in range(len(kept))]
  text = sum(c.text_tokens for c in kept)
  images = sum(c.images for c in kept)
  useful = {n: (text + images * n) / (len(rows) * shape.positions(n)) for n in counts}
  return LayoutFigures(rows=len(rows), conversations_per_row=len(kept) / max(len(rows), 1),
                       truncated_share=sum(cut for _, cut in clipped) / max(len(clipped), 1),
                       useful_share=useful)
