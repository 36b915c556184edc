"""LLaVA conversation JSON: reading and validating rows.

The format (LLaVA-1.5 ``llava_v1_5_mix665k.json`` and its many descendants) is a JSON
list of rows::

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is the bus doing?"},
                     {"from": "gpt", "value": "It is parked."}, ...]}

``image`` is relative to an image folder, or a list of them (several images, as
LLaVA-OneVision's rows: one ``<image>`` marker each, in order, or MMMU-style
``<image k>`` markers). The turns follow `conversation`'s rules (roles, human -> gpt
alternation, markers in human turns only); on top of them the markers must match the
images (`conversation.image_order`: a row without ``image``, or null or [], is a
text-only row, such as the ShareGPT rows of LLaVA-1.5's mix, and has none), and every
row needs a non-empty reply to every question and a reply as its last turn. A
text-only row trains the LLM on its text alone. A row that breaks these
rules is malformed: `read_llava` raises `rows.MalformedRowError` naming the file, the row
and what is wrong, or, with ``skip_malformed``, leaves the row out and counts it by reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from tokenflex_jax import paths
from tokenflex_jax.data import conversation
from tokenflex_jax.data.conversation import ASSISTANT, ConversationError
from tokenflex_jax.data.rows import (MalformedRowError, check_text, collect_rows, data_lines,
                                     json_line, read_text)
from tokenflex_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One usable row: its id, its image files (none: a text-only row) and its turns as
  (role, text) pairs, the roles "user" and "assistant"."""
  id: str
  image_paths: tuple[str, ...]
  turns: tuple[tuple[str, str], ...]
  row: int


def _parse_turns(conversations: list[Any], row_id: str,
                 bad: Callable[[str, str], MalformedRowError], images: int
                 ) -> tuple[tuple[str, str], ...]:
  """A row's "conversations" list -> (role, text) turns, validated by `conversation`'s
  rules plus LLaVA's own (markers matching the row's ``images``); raises
  ``bad(reason, detail)``."""
  turns, parsed = [], []
  system_first = isinstance(conversations[0], dict) and conversation.is_system(
      conversations[0].get("from"))
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise bad("unknown role", f"id {row_id!r}, turn {i}: {turn!r}")
    text = turn.get("value")
    try:
      parsed.append(conversation.parse_turn(i, turn.get("from", ""),
                                            text if isinstance(text, str) else "",
                                            system_first))
      role = parsed[-1].role
    except ConversationError as e:
      raise bad(e.reason, f"id {row_id!r}, {e}") from None
    if not isinstance(text, str) or (role == ASSISTANT and not text.strip()):
      raise bad("empty answer" if role == ASSISTANT else "empty question",
                f"id {row_id!r}, turn {i}")
    turns.append((role, text))
  if turns[-1][0] != ASSISTANT:
    raise bad("empty answer", f"id {row_id!r}: the last turn has no reply")
  try:
    conversation.image_order(parsed, images)
  except ConversationError as e:
    raise bad(e.reason, f"id {row_id!r}: {e}" + (
        " (a text-only row has no marker)" if not images else "")) from None
  return tuple(turns)


def parse_row(raw: object, path: str, row: int, image_dir: str) -> Conversation:
  """Validates one decoded JSON row; raises `MalformedRowError` naming ``path`` and ``row``."""
  bad = lambda reason, detail="": MalformedRowError(path, row, reason, detail)
  if not isinstance(raw, dict):
    raise bad("not an object", type(raw).__name__)
  check_text(raw, path, row)
  row_id = raw.get("id", row)
  if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
    raise bad("mistyped id", f"'id' is {type(row_id).__name__} {row_id!r:.80}")
  row_id = str(row_id)
  image = raw.get("image")
  names = [] if image is None else image if isinstance(image, list) else [image]
  image_paths = []
  for name in names:  # absent, null or []: a text-only row
    if not name or not isinstance(name, str):
      raise bad("missing image", f"id {row_id!r}: 'image' is {image!r:.80}")
    image_paths.append(os.path.join(image_dir, name))
    if not paths.is_file(image_paths[-1]):
      raise bad("missing image", f"id {row_id!r}: {image_paths[-1]} does not exist")
  conversations = raw.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise bad("no conversations", f"id {row_id!r}")
  return Conversation(row_id, tuple(image_paths),
                      _parse_turns(conversations, row_id, bad, len(image_paths)), row)


def read_llava(path: str, image_dir: str, skip_malformed: bool = False
               ) -> tuple[list[Conversation], dict[str, int]]:
  """Reads and validates a LLaVA JSON file (a list of rows, or JSON lines).

  Returns (the usable rows in file order, {reason: count} of the rows left out). Without
  ``skip_malformed`` the first malformed row raises `MalformedRowError`. Rows are
  numbered from 0 in the list (in a JSON-lines file: among its non-empty lines). Text is
  decoded per row: bytes that are not UTF-8 make their row "invalid UTF-8". A JSON list
  broken in its structure cannot be read past the break: `MalformedRowError` "invalid
  JSON" naming the row where it breaks, even with ``skip_malformed``; in JSON lines a
  line that is not JSON is one malformed row.
  """
  text = read_text(path)
  if text.lstrip().startswith("["):
    rows = _json_list(text, path)
  else:
    lines = data_lines(text)
    if not lines:
      raise InputError(f"{path}: no rows (expected a JSON list or JSON lines of "
                       "conversation rows)")

    def parse_line(i: int, line: str) -> Conversation:
      return parse_row(json_line(line, path, i), path, i, image_dir)

    return collect_rows(lines, parse_line, skip_malformed)
  return collect_rows(rows, lambda i, raw: parse_row(raw, path, i, image_dir), skip_malformed)


def _json_list(text: str, path: str) -> list[Any]:
  """A JSON list's items; where it does not parse, `MalformedRowError` "invalid JSON"
  naming the first row it cannot read (then a line and column of the file)."""
  try:
    rows = json.loads(text)
  except (ValueError, RecursionError) as e:
    error = str(e)
  else:
    if isinstance(rows, list):
      return rows
    error = "not a list"
  decoder = json.JSONDecoder()
  ws = re.compile(r"[ \t\n\r]*")
  pos, row = ws.match(text, text.index("[") + 1).end(), 0
  if text.startswith("]", pos):
    pos = ws.match(text, pos + 1).end()
    rows_end = True
  else:
    rows_end = False
  while not rows_end:
    try:
      _, pos = decoder.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:
      raise _list_break(path, row, text, pos, str(e)) from None
    row += 1
    pos = ws.match(text, pos).end()
    if text.startswith(",", pos):
      pos = ws.match(text, pos + 1).end()
    elif text.startswith("]", pos):
      pos = ws.match(text, pos + 1).end()
      rows_end = True
    else:
      raise _list_break(path, row, text, pos, "expected ',' or ']' after the row")
  raise _list_break(path, row, text, pos,
                    "extra data after the list" if pos < len(text) else error)


def _list_break(path: str, row: int, text: str, pos: int, why: str) -> MalformedRowError:
  line = text.count("\n", 0, pos) + 1
  column = pos - (text.rfind("\n", 0, pos) + 1) + 1
  return MalformedRowError(path, row, "invalid JSON", f"line {line} column {column}: "
                           f"{why[:200]} (the list cannot be read past this row)")


def turns_from_json(text: str) -> Sequence[tuple[str, str]]:
  """The stored form of a conversation (JSON [[role, text], ...]) -> turns."""
  return [(role, value) for role, value in json.loads(text)]


def check_turns(turns: Sequence[tuple[str, str]], row_id: str,
                bad: Callable[[str, str], MalformedRowError], images: int
                ) -> tuple[tuple[str, str], ...]:
  """Stored turns (`turns_from_json`) of a row with ``images`` images, validated by the
  same rules as a JSON row's (`parse_row`); raises ``bad(reason, detail)``."""
  if not turns:
    raise bad("no conversations", f"id {row_id!r}")
  return _parse_turns([{"from": role, "value": text} for role, text in turns], row_id, bad,
                      images)
