"""A VLMEvalKit benchmark TSV as an evaluation set: its questions asked as VLMEvalKit's
dataset asks them, scored by `benchmarks.score`, and its predictions written in
VLMEvalKit's layout (``config.eval.suite = "vlmeval"``).

Images: the ``image`` cell is base64; a cell of at most 64 characters is the index of
the row whose image it shares; ``"[...]"`` holds several. VLMEvalKit puts a row's images
before its text, except MMMU's, which go where its ``<image k>`` markers are (an image
without a marker is left out); here each image becomes a placeholder in the prompt in
that order.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax.data import conversation
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.data.images import ImageError
from tokenflex_jax.data.pipeline import decode_image
from tokenflex_jax.errors import InputError
from tokenflex_jax.evaluation import benchmarks, matching

_REFERENCE_LENGTH = 64


def row_images(rows: Sequence[Mapping[str, str]], path: str) -> list[list[str]]:
  """Each row's images as base64 strings: references followed one level, lists split."""
  by_index = {r["index"]: r for r in rows}
  out = []
  for r in rows:
    cell = (r.get("image") or "").strip()
    if 0 < len(cell) <= _REFERENCE_LENGTH:
      cell = (by_index.get(cell) or {}).get("image", "").strip()
    if not cell or benchmarks.missing(cell):
      raise InputError(f"{path}: index {r['index']}: no image")
    if cell.startswith("[") and cell.endswith("]"):
      try:
        out.append([str(x) for x in ast.literal_eval(cell)])
      except (ValueError, SyntaxError):
        raise InputError(f"{path}: index {r['index']}: an image list that does not "
                         "parse") from None
    else:
      out.append([cell])
  return out


def user_text(benchmark: str, row: Mapping[str, str], images: int, image_first: bool
              ) -> str:
  """The user turn with image markers: MMMU's own ``<image k>`` markers where it has
  them, else one ``<image>`` per image before the prompt (one image: before or after,
  as ``image_first`` says)."""
  text = benchmarks.prompt(benchmark, row)
  if benchmark == "MMMU_DEV_VAL" and conversation.MARKER.search(text):
    return text
  if images == 1:
    return conversation.question_with_image(text, image_first)
  return conversation.IMAGE_MARKER * images + "\n" + text


def predictions_tsv(rows: Sequence[Mapping[str, str]], texts: Sequence[str]) -> str:
  """VLMEvalKit's predictions layout: the rows' columns without ``image``, then
  ``prediction``."""
  columns = [c for c in rows[0] if c != "image"] + ["prediction"]
  buf = io.StringIO()
  writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
  writer.writerow(columns)
  for r, t in zip(rows, texts, strict=True):
    writer.writerow([r.get(c, "") for c in columns[:-1]] + [t])
  return buf.getvalue()


class BenchmarkSet:
  """A benchmark TSV read for evaluation.

  rows: the TSV's rows; images: uint8 [M, H, W, 3], each distinct image decoded once;
  image_index: int [N, K] (-1: an unused slot), the images of each prompt in placeholder
  order; prompt_ids: N token lists ending with the assistant header."""

  def __init__(self, path: str, benchmark: str, tokenizer: ChatTokenizer, image_size: int,
               image_first: bool):
    self.path, self.benchmark = path, benchmarks.recognise(path, benchmark)
    self.rows = benchmarks.read_rows(path, benchmarks.REQUIRED[self.benchmark])
    benchmarks.check_rows(self.benchmark, self.rows, path)  # before hours of generation
    decoded: dict[str, int] = {}
    images: list[np.ndarray] = []
    order, self.prompt_ids = [], []
    for r, cells in zip(self.rows, row_images(self.rows, path)):
      text = user_text(self.benchmark, r, len(cells), image_first)
      try:
        slots = conversation.image_order(
            conversation.parse_conversation([(conversation.USER, text)]), len(cells))
        prompt_ids = tokenizer.conversation_ids([(conversation.USER, text)])[0]
      except conversation.ConversationError as e:
        raise InputError(f"{path}: index {r['index']}: {e}") from None
      ids = []
      for k in slots:
        if cells[k] not in decoded:
          decoded[cells[k]] = len(images)
          images.append(self._decode(cells[k], r["index"], image_size))
        ids.append(decoded[cells[k]])
      order.append(ids)
      self.prompt_ids.append(prompt_ids)
    width = max(len(o) for o in order)
    self.image_index = np.array([o + [-1] * (width - len(o)) for o in order], np.int64)
    self.images = np.stack(images)

  def _decode(self, cell: str, index: str, size: int) -> np.ndarray:
    try:
      return decode_image(base64.b64decode(cell, validate=True), size)
    except (ValueError, ImageError) as e:
      raise InputError(f"{self.path}: index {index}: the image does not decode: {e}"
                       ) from None

  def score(self, texts: Sequence[str]) -> dict[str, Any]:
    """`benchmarks.score` of one prediction per row."""
    return benchmarks.score(self.benchmark, self.rows, list(texts))

  def prompt_scores(self, texts: Sequence[str]) -> np.ndarray:
    """Each row's own credit in [0, 1]: the option, yes / no or OCR rule on it alone
    (MMVet: 0, no rule)."""
    credit = [headline(self.score_one(r, t), 1) for r, t in zip(self.rows, texts)]
    return np.nan_to_num(np.array(credit, np.float64))

  def score_one(self, row: Mapping[str, str], text: str) -> dict[str, Any]:
    if self.benchmark == "MMBench_DEV_EN_V11":  # one copy on its own
      return benchmarks.score("MMStar", [row], [text])
    if self.benchmark == "HallusionBench":
      return {"aAcc": 100.0 * (row["answer"] == matching.yes_or_no(text))}
    return benchmarks.score(self.benchmark, [row], [text])


def headline(figures: Mapping[str, Any], questions: int) -> float:
  """A benchmark's headline as a fraction: MC ``Overall``; HallusionBench's mean of
  aAcc, fAcc, qAcc (the OpenVLM leaderboard's; aAcc alone for one row); OCRBench's Final
  Score over its ``questions``; MathVista's acc; MMVet: nan (not scored)."""
  if "Overall" in figures:
    return float(figures["Overall"])
  if "aAcc" in figures:
    keys = [k for k in ("aAcc", "fAcc", "qAcc") if k in figures]
    return float(np.mean([figures[k] for k in keys])) / 100
  if "Final Score" in figures:
    return float(figures["Final Score"]) / max(questions, 1)
  if "acc" in figures:
    return float(figures["acc"]) / 100
  return float("nan")
