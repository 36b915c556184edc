"""Packed training rows: several conversations per row, planned from their lengths.

`PackedRows` is a random-access source of rows over a stream of conversations (a
shuffled source, or a `MixedSource`'s stream). When it is made it measures every
conversation of one pass over the stream without decoding its images
(`TokenizingPreprocess.lengths`) and plans the rows by streaming first fit
(`pack.FirstFit`, deterministic in the stream order); row r is then assembled on demand
from its members' `Piece`s. A row is the same whenever and wherever it is read, so a
resumed run, or one on another number of processes, reads the same rows, and the input
pipeline resumes by row index as it does for unpacked rows.

A row (T = C + K token slots, K image slots): tokens [T] i32, loss_mask [T] f32, segments
[T] i32 (1, 2, ... per conversation, 0 on the padding), image [K, S, S, 3] f32 ([S, S, 3]
when K = 1), its conversations' images in order; the model keeps the conversations apart
(`models.vlm`).

Bad conversations: one that cannot be measured (broken turns, too long without
``config.data.truncate``) stops the run when the source is opened under
``on_bad_record="error"``, or is left out of the plan and logged under "skip"; one whose
image cannot be read or decoded when its row is assembled stops the run, or under "skip"
is left out of its row (its slots stay padding) and counted by reason; a row left with
no conversation holds the next one that has one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from tokenflex_jax.data import pack
from tokenflex_jax.data.rows import MAX_BAD_IN_A_ROW, too_many_bad
from tokenflex_jax.errors import InputError

Encode = Callable[[InputError | None], np.ndarray]


class _Measure(grain.transforms.Map):
  """Stream index -> (text tokens, images), or (-1, -1) and the reason under "skip" (a
  conversation that cannot be read or measured)."""

  def __init__(self, stream: Any, preprocess: Any, skip: bool):
    self._stream, self._preprocess, self._skip = stream, preprocess, skip

  def map(self, i: int) -> tuple[int, int, str]:
    try:
      lengths = self._preprocess.lengths(self._stream[int(i)])
    except InputError as e:
      if not self._skip:
        raise
      return -1, -1, f"{getattr(e, 'reason', '') or type(e).__name__}: {e}"
    return lengths.text_tokens, lengths.images, ""


def measure(stream: Any, preprocess: Any, skip: bool, num_workers: int = 0
            ) -> tuple[np.ndarray, dict[str, int]]:
  """Lengths [E, 2] (text tokens, images; -1 for a conversation left out) of the stream's
  first E = len(stream) conversations, and {reason: count} of those left out."""
  ds = grain.MapDataset.range(len(stream)).map(_Measure(stream, preprocess, skip))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  lengths = np.zeros((len(stream), 2), np.int64)
  left_out: collections.Counter[str] = collections.Counter()
  for i, (text, images, why) in enumerate(it):
    lengths[i] = text, images
    if why:
      left_out[why.split(":", 1)[0]] += 1
      logging.warning("packing leaves out conversation %d of the stream "
                      "(config.data.on_bad_record='skip'): %s", i, why)
  return lengths, dict(left_out)


def plan_rows(lengths: np.ndarray, shape: pack.RowShape, open_rows: int = 64
              ) -> list[tuple[int, ...]]:
  """`pack.FirstFit` over the measured conversations (rows of stream indices, in order);
  those measured -1 are left out."""
  packer, rows = pack.FirstFit(shape, open_rows), []
  for i, (text, images) in enumerate(lengths.tolist()):
    if text >= 0:
      rows += packer.add(i, pack.Lengths(text, images))
  return [tuple(row) for row in rows + packer.finish()]


class PackedRows:
  """Random access over packed rows of ``stream`` (module docstring).

  Args:
    stream: random access over the conversations, in packing order (shuffled).
    preprocess: its `piece(element)` and `lengths(element)` (a `TokenizingPreprocess`,
      or a mixture's `PerSource`).
    shape: C text tokens and K image slots per row.
    image_size, pad_id: of the rows' images and padding.
    skip: ``config.data.on_bad_record == "skip"``; ``encode_reason`` then puts each bad
      conversation's reason into its row under ``reason_key`` ([M, ...] for rows of at
      most M conversations, zeros where none), and `rows.MAX_BAD_IN_A_ROW` bad
      conversations in a row raise `InputError`.
    names: a mixture's source names; each row then counts its conversations per source
      (int32 [len(names)] under ``source_key``).
  """

  def __init__(self, stream: Any, preprocess: Any, shape: pack.RowShape, image_size: int,
               pad_id: int, *, skip: bool = False, num_workers: int = 0,
               names: Sequence[str] = (), source_key: str = "", reason_key: str = "",
               encode_reason: Encode | None = None):
    self._stream, self._preprocess, self.shape = stream, preprocess, shape
    self._image_size, self._pad_id, self._skip = image_size, pad_id, skip
    self.names, self._source_key = tuple(names), source_key
    self._reason_key, self._encode_reason = reason_key, encode_reason
    self.lengths, self.left_out = measure(stream, preprocess, skip, num_workers)
    self._rows = plan_rows(self.lengths, shape)
    self._most = max((len(row) for row in self._rows), default=0)
    self._max_bad = min(MAX_BAD_IN_A_ROW, sum(len(row) for row in self._rows))
    if not self._rows:
      raise InputError(f"no conversation of the {len(stream)} in the training data fits a "
                       f"row of {shape.text_capacity} text tokens and {shape.image_slots} "
                       "image slots")
    logging.info("packed %d conversations into %d rows of %d text tokens and %d image slots "
                 "(%.2f per row)", int((self.lengths[:, 0] >= 0).sum()), len(self._rows),
                 shape.text_capacity, shape.image_slots,
                 (self.lengths[:, 0] >= 0).sum() / len(self._rows))

  def __len__(self) -> int:
    return len(self._rows)

  def members(self, r: int) -> tuple[int, ...]:
    """The stream indices of row ``r``'s conversations."""
    return self._rows[r]

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    row, bad = self._assemble(r)
    if not self._skip:
      return row
    # A row whose every conversation is bad holds the next row with a good one (as
    # `pipeline.SkipBadRecords` does for records); its own are counted here, the others'
    # at their own rows. A run of `rows.MAX_BAD_IN_A_ROW` bad conversations stops.
    reasons = np.zeros((self._most, *self._encode_reason(None).shape), np.uint8)
    for j, e in enumerate(bad):
      reasons[j] = self._encode_reason(e)
    in_a_row, step = len(bad), 0
    while not row["segments"].any():
      if in_a_row >= self._max_bad:
        raise too_many_bad(in_a_row, "conversations", bad[-1])
      step += 1
      row, bad = self._assemble((r + step) % len(self._rows))
      in_a_row += len(bad)
    row[self._reason_key] = reasons
    return row

  def _assemble(self, r: int) -> tuple[dict[str, np.ndarray], list[InputError]]:
    """Row ``r`` and, under "skip", the errors of the conversations left out of it."""
    c, k = self.shape.text_capacity, self.shape.image_slots
    size = self._image_size
    row = {"image": np.zeros((k, size, size, 3), np.float32),
           "tokens": np.full((c + k,), self._pad_id, np.int32),
           "loss_mask": np.zeros((c + k,), np.float32),
           "segments": np.zeros((c + k,), np.int32)}
    counts = np.zeros((len(self.names),), np.int32)
    at = slot = segment = 0
    bad: list[InputError] = []
    for i in self._rows[r]:
      try:
        element = self._stream[i]
        piece = self._preprocess.piece(element)
      except InputError as e:
        if not self._skip:
          raise
        logging.warning("skipping a bad record (config.data.on_bad_record='skip'): %s", e)
        bad.append(e)
        continue
      n, m = len(piece.tokens), len(piece.images)
      if at + n > c + k or slot + m > k:
        raise AssertionError(f"conversation {i} of the stream measured {self.lengths[i]} "
                             f"but is {n - m} text tokens and {m} images")
      segment += 1
      row["tokens"][at:at + n] = piece.tokens
      row["loss_mask"][at:at + n] = piece.loss_mask
      row["segments"][at:at + n] = segment
      row["image"][slot:slot + m] = piece.images
      at, slot = at + n, slot + m
      if self.names:
        counts[int(element[self._source_key])] += 1
    if k == 1:
      row["image"] = row["image"][0]
    if self.names:
      row[self._source_key] = counts
    return row, bad


class PerSource:
  """A mixture's preprocessing: each element by its source's transform (the element's
  index under ``source_key``), as `piece` and `lengths`."""

  def __init__(self, transforms: Sequence[Any], source_key: str):
    self._transforms, self._key = list(transforms), source_key

  def piece(self, element: Mapping[str, Any]) -> Any:
    return self._transforms[int(element[self._key])].piece(element)

  def lengths(self, element: Mapping[str, Any]) -> pack.Lengths:
    return self._transforms[int(element[self._key])].lengths(element)
