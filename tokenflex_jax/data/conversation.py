"""Conversations as (role, text) turns: parsing, the image marker, formatting over ids.

Every chat tokenizer (`chat.ChatTokenizer`) formats the same parsed turns in its own
template, so the rules live here once: roles are "user" and "assistant" (LLaVA's "human"
and "gpt" too), after an optional first "system" turn; turns alternate starting with the
user, and the literal ``<image>`` marker sits at most once in the conversation, in a
user turn. The marker and one newline right
after it are cut out; the tokenizer puts its single image placeholder id there. The LLaVA
reader (`llava`) validates data rows by the same rules (`parse_turn`, `count_markers`);
a broken rule raises `ConversationError`, whose ``reason`` names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

from tokenflex_jax.errors import InputError

IMAGE_MARKER = "<image>"
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES: dict[str, str] = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT,
                         "system": SYSTEM}


@dataclasses.dataclass(frozen=True)
class Turn:
  """One turn with the image marker cut out: ``before`` [image] ``after``.

  Without an image ``before`` holds the whole text and ``after`` is "".
  """
  role: str
  before: str
  after: str = ""
  has_image: bool = False

  def trimmed(self) -> Turn:
    """The turn as templates that trim their texts see it: whitespace at either end of
    the text goes, the image counting as text (so the whitespace beside it stays)."""
    if self.has_image:
      return dataclasses.replace(self, before=self.before.lstrip(), after=self.after.rstrip())
    return dataclasses.replace(self, before=self.before.strip())


class ConversationError(InputError):
  """Turns that break the rules above; ``reason`` names the rule broken in a few words
  (what a reader of data rows counts skipped rows by), the message says where."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)

  def __reduce__(self):  # Picklable: grain's worker processes send errors back.
    return type(self), (self.reason, str(self))


def count_markers(texts: Sequence[str]) -> int:
  """The number of image markers in a conversation's texts (0 or 1); `ConversationError`
  if there are more."""
  markers = sum(text.count(IMAGE_MARKER) for text in texts)
  if markers > 1:
    raise ConversationError(f"more than one {IMAGE_MARKER} marker",
                            f"the image marker {IMAGE_MARKER!r} appears {markers} times in "
                            "the conversation; it may appear at most once")
  return markers


def is_system(role: object) -> bool:
  """Whether ``role`` names the system (a conversation's optional first turn)."""
  return isinstance(role, str) and ROLES.get(role) == SYSTEM


def parse_turn(i: int, role: str, text: str, system_first: bool = False) -> Turn:
  """Turn ``i`` of a conversation whose turn 0 is a system turn or not (``system_first``):
  checks its role (a system turn only first, then alternating user, assistant, ... from
  the user) and that an image marker in it sits in a user turn, and cuts the marker out."""
  name = ROLES.get(role) if isinstance(role, str) else None
  if name is None:
    raise ConversationError("unknown role", f"turn {i} has the unknown role {role!r}; "
                            f"expected one of {sorted(ROLES)}")
  if name == SYSTEM and i > 0:
    raise ConversationError("turns out of order", f"turn {i} is {role!r}; a system turn "
                            "can only be the first")
  if name != SYSTEM:
    expected = USER if (i - system_first) % 2 == 0 else ASSISTANT
    if name != expected:
      raise ConversationError("turns out of order",
                              f"turn {i} is {role!r} but turns must alternate user, "
                              "assistant, ... starting with the user (after an optional "
                              "system turn)")
  if IMAGE_MARKER not in text:
    return Turn(name, text)
  if name != USER:
    where = f"{'an' if name == ASSISTANT else 'a'} {name} turn"
    raise ConversationError(f"{IMAGE_MARKER} marker in {where}",
                            f"turn {i}: the image marker {IMAGE_MARKER!r} is in {where}; it "
                            "belongs in a user turn")
  before, _, after = text.partition(IMAGE_MARKER)
  return Turn(name, before, after.removeprefix("\n"), has_image=True)


def parse_conversation(turns: Sequence[tuple[str, str]]) -> list[Turn]:
  """Validates (role, text) turns and cuts the image marker out of its user turn.

  Raises `ConversationError` (a ValueError) for an empty conversation, a repeated
  marker, or a turn that `parse_turn` rejects (unknown role, out of order, the marker in
  an assistant turn).
  """
  if not turns or (is_system(turns[0][0]) and len(turns) == 1):
    raise ConversationError("no turns", "a conversation needs at least one user turn")
  count_markers([text for _, text in turns])
  system_first = is_system(turns[0][0])
  return [parse_turn(i, role, text, system_first) for i, (role, text) in enumerate(turns)]


def question_with_image(question: str, image_first: bool) -> str:
  """The user text of a single-image question: the marker before or after it."""
  return f"{IMAGE_MARKER}\n{question}" if image_first else f"{question}{IMAGE_MARKER}"


def check_image_count(ids: Sequence[int], image_id: int, turns: Sequence[Turn]) -> None:
  """Raises `ConversationError` (a ValueError) unless ``ids`` hold the image id once per
  marker: a text that spells out the image token itself would make the spliced image
  land twice."""
  expected = sum(t.has_image for t in turns)
  found = sum(1 for i in ids if i == image_id)
  if found != expected:
    raise ConversationError("image token in a text",
                            f"the conversation gives {found} image placeholder ids (id "
                            f"{image_id}) for {expected} {IMAGE_MARKER!r} markers: does a "
                            "text contain the image token itself?")


@dataclasses.dataclass(frozen=True)
class IdTemplate:
  """A chat template assembled from ids, each text encoded on its own.

  A conversation is ``begin``, then per user turn ``user_open + text + user_close`` and
  per assistant turn ``assistant_open + reply + [end_of_turn] + assistant_close``; one
  that ends with a user turn gets ``assistant_open`` (the generation prompt). ``trim``
  strips the whitespace around every text first.
  """
  begin: tuple[int, ...]
  user_open: tuple[int, ...]
  user_close: tuple[int, ...]
  assistant_open: tuple[int, ...]
  end_of_turn: int
  assistant_close: tuple[int, ...]
  trim: bool


def format_ids(template: IdTemplate, turns: Sequence[Turn], encode: Callable[[str], list[int]],
               image_id: int) -> tuple[list[int], list[bool]]:
  """Parsed turns -> (ids [L], mask [L]); the mask is True on every assistant reply and
  its end-of-turn id, the tokens a trainer puts loss on."""
  ids: list[int] = []
  mask: list[bool] = []

  def add(chunk: Sequence[int], loss: bool = False) -> None:
    ids.extend(chunk)
    mask.extend([loss] * len(chunk))

  if turns[0].role == SYSTEM:
    raise ConversationError("system turn", "this tokenizer's chat template takes no system "
                            "turn (the project's, llama2 and gemma templates)")
  add(template.begin)
  for turn in turns:
    if template.trim:
      turn = turn.trimmed()
    if turn.role == USER:
      add(template.user_open)
      add(encode(turn.before))
      if turn.has_image:
        add([image_id])
      add(encode(turn.after))
      add(template.user_close)
    else:
      add(template.assistant_open)
      add([*encode(turn.before), template.end_of_turn], loss=True)
      add(template.assistant_close)
  if turns[-1].role == USER:
    add(template.assistant_open)
  check_image_count(ids, image_id, turns)
  return ids, mask


def text_ids(ids: Sequence[int], stop: Collection[int], drop: Collection[int]) -> list[int]:
  """The ids a decoder turns into text: up to the first id in ``stop``, without ``drop``."""
  kept = []
  for i in ids:
    i = int(i)
    if i in stop:
      break
    if i not in drop:
      kept.append(i)
  return kept
