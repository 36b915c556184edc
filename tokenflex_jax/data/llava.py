"""LLaVA conversation JSON: reading and validating rows.

The format (LLaVA-1.5 ``llava_v1_5_mix665k.json`` and its many descendants) is a JSON
list of rows::

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is the bus doing?"},
                     {"from": "gpt", "value": "It is parked."}, ...]}

``image`` is relative to an image folder. Turns alternate human -> gpt; the one
``<image>`` marker sits in a human turn. Rows without an image (LLaVA-1.5's mix has
about 41k text-only ShareGPT rows) cannot be used: the model takes one image per
conversation. A row that breaks these rules is malformed:
`read_llava` raises an error naming the file, the row and what is wrong, or, with
``skip_malformed``, leaves the row out and counts it by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class MalformedRowError(ValueError):
  """A data row that cannot be used; the message names the file and the row."""

  def __init__(self, path: str, row: int, reason: str, detail: str = ""):
    self.path, self.row, self.reason = path, row, reason
    super().__init__(f"{path}: row {row}: {reason}{': ' + detail if detail else ''}")


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One usable row: its id, its image file and its turns as (role, text) pairs."""
  id: str
  image_path: str
  turns: tuple[tuple[str, str], ...]
  row: int


def parse_row(raw: object, path: str, row: int, image_dir: str) -> Conversation:
  """Validates one decoded JSON row; raises `MalformedRowError` naming ``path`` and ``row``."""
  bad = lambda reason, detail="": MalformedRowError(path, row, reason, detail)
  if not isinstance(raw, dict):
    raise bad("not an object", type(raw).__name__)
  row_id = str(raw.get("id", row))
  image = raw.get("image")
  if "image" not in raw:  # LLaVA-1.5's mix has ~41k of these (ShareGPT text).
    raise bad("text-only row", f"id {row_id!r} has no 'image' field; this model needs one "
              "image per conversation")
  if not image or not isinstance(image, str):
    raise bad("missing image", f"id {row_id!r}: 'image' is {image!r}")
  image_path = os.path.join(image_dir, image)
  if not os.path.isfile(image_path):
    raise bad("missing image", f"id {row_id!r}: {image_path} does not exist")
  conversations = raw.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise bad("no conversations", f"id {row_id!r}")
  turns = []
  for i, turn in enumerate(conversations):
    role = ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
    if role is None:
      raise bad("unknown role", f"id {row_id!r}, turn {i}: {turn!r}")
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise bad("turns out of order", f"id {row_id!r}, turn {i} is {role}, expected {expected}")
    text = turn.get("value")
    if not isinstance(text, str) or (role == "assistant" and not text.strip()):
      raise bad("empty answer" if role == "assistant" else "empty question",
                f"id {row_id!r}, turn {i}")
    turns.append((role, text))
  if turns[-1][0] != "assistant":
    raise bad("empty answer", f"id {row_id!r}: the last turn has no reply")
  markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
  if markers != 1 or IMAGE_MARKER in "".join(t for r, t in turns if r == "assistant"):
    raise bad("no <image> marker" if markers == 0 else "more than one <image> marker",
              f"id {row_id!r} needs exactly one {IMAGE_MARKER} in a human turn, has {markers}")
  return Conversation(row_id, image_path, tuple(turns), row)


def read_llava(path: str, image_dir: str, skip_malformed: bool = False
               ) -> tuple[list[Conversation], dict[str, int]]:
  """Reads and validates a LLaVA JSON file (a list of rows, or JSON lines).

  Returns (the usable rows in file order, {reason: count} of the rows left out). Without
  ``skip_malformed`` the first malformed row raises `MalformedRowError`. Rows are
  numbered from 0 in the list (in a JSON-lines file: among its non-empty lines).
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    rows = json.loads(text)
  except json.JSONDecodeError:
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [_json_line(line, path, i) for i, line in enumerate(lines)]
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of conversation rows, "
                     f"got {type(rows).__name__}")
  return collect_rows(rows, lambda i, raw: parse_row(raw, path, i, image_dir), skip_malformed)


def collect_rows(rows: Sequence[Any], parse: Callable[[int, Any], T], skip_malformed: bool
                 ) -> tuple[list[T], dict[str, int]]:
  """[parse(row number, row)] for every row; a `MalformedRowError` propagates, or with
  ``skip_malformed`` leaves the row out and is counted: returns (parsed, {reason: rows})."""
  out, skipped = [], collections.Counter()
  for i, row in enumerate(rows):
    try:
      out.append(parse(i, row))
    except MalformedRowError as e:
      if not skip_malformed:
        raise
      skipped[e.reason] += 1
  return out, dict(skipped)


def _json_line(line: str, path: str, row: int) -> object:
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise MalformedRowError(path, row, "invalid JSON", str(e)) from None


def format_skipped(skipped: dict[str, int]) -> str:
  """{"missing image": 2} -> "2 rows skipped (missing image: 2)"; "" if none."""
  if not skipped:
    return ""
  total = sum(skipped.values())
  return f"{total} rows skipped ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"


def turns_from_json(text: str) -> Sequence[tuple[str, str]]:
  """The stored form of a conversation (JSON [[role, text], ...]) -> turns."""
  return [(role, value) for role, value in json.loads(text)]
