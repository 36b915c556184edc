"""LLaVA conversation JSON: reading and validating rows.

The format (LLaVA-1.5 ``llava_v1_5_mix665k.json`` and its many descendants) is a JSON
list of rows::

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is the bus doing?"},
                     {"from": "gpt", "value": "It is parked."}, ...]}

``image`` is relative to an image folder. The turns follow `conversation`'s rules
(roles, human -> gpt alternation, the ``<image>`` marker at most once, in a human turn);
on top of them a row needs its marker (the model takes one image per conversation, so
text-only rows, such as the ShareGPT rows of LLaVA-1.5's mix, cannot be used), a
non-empty reply to every question and a reply as its last turn. A row that breaks these
rules is malformed: `read_llava` raises `rows.MalformedRowError` naming the file, the row
and what is wrong, or, with ``skip_malformed``, leaves the row out and counts it by reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from tokenflex_jax.data import conversation
from tokenflex_jax.data.conversation import ASSISTANT, IMAGE_MARKER, ConversationError
from tokenflex_jax.data.rows import MalformedRowError, collect_rows, json_line


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One usable row: its id, its image file and its turns as (role, text) pairs, the
  roles "user" and "assistant"."""
  id: str
  image_path: str
  turns: tuple[tuple[str, str], ...]
  row: int


def _parse_turns(conversations: list[Any], row_id: str,
                 bad: Callable[[str, str], MalformedRowError]) -> tuple[tuple[str, str], ...]:
  """A row's "conversations" list -> (role, text) turns, validated by `conversation`'s
  rules plus LLaVA's own; raises ``bad(reason, detail)``."""
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise bad("unknown role", f"id {row_id!r}, turn {i}: {turn!r}")
    text = turn.get("value")
    try:
      role = conversation.parse_turn(i, turn.get("from", ""),
                                     text if isinstance(text, str) else "").role
    except ConversationError as e:
      raise bad(e.reason, f"id {row_id!r}, {e}") from None
    if not isinstance(text, str) or (role == ASSISTANT and not text.strip()):
      raise bad("empty answer" if role == ASSISTANT else "empty question",
                f"id {row_id!r}, turn {i}")
    turns.append((role, text))
  if turns[-1][0] != ASSISTANT:
    raise bad("empty answer", f"id {row_id!r}: the last turn has no reply")
  try:
    markers = conversation.count_markers([text for _, text in turns])
  except ConversationError as e:
    raise bad(e.reason, f"id {row_id!r}: {e}") from None
  if not markers:
    raise bad(f"no {IMAGE_MARKER} marker",
              f"id {row_id!r} needs exactly one {IMAGE_MARKER} in a human turn, has 0")
  return tuple(turns)


def parse_row(raw: object, path: str, row: int, image_dir: str) -> Conversation:
  """Validates one decoded JSON row; raises `MalformedRowError` naming ``path`` and ``row``."""
  bad = lambda reason, detail="": MalformedRowError(path, row, reason, detail)
  if not isinstance(raw, dict):
    raise bad("not an object", type(raw).__name__)
  row_id = str(raw.get("id", row))
  image = raw.get("image")
  if "image" not in raw:
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
  return Conversation(row_id, image_path, _parse_turns(conversations, row_id, bad), row)


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
    rows = [json_line(line, path, i) for i, line in enumerate(lines)]
  if not isinstance(rows, list):
    raise ValueError(f"{path}: expected a JSON list of conversation rows, "
                     f"got {type(rows).__name__}")
  return collect_rows(rows, lambda i, raw: parse_row(raw, path, i, image_dir), skip_malformed)


def turns_from_json(text: str) -> Sequence[tuple[str, str]]:
  """The stored form of a conversation (JSON [[role, text], ...]) -> turns."""
  return [(role, value) for role, value in json.loads(text)]
