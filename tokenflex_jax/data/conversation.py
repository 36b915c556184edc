"""Conversations as (role, text) turns: parsing, the image marker, formatting over ids.

Every chat tokenizer (`chat.ChatTokenizer`) formats the same parsed turns in its own
template, so the rules live here once: roles are "user" and "assistant" (LLaVA's "human"
and "gpt" too), turns alternate starting with the user, and the literal ``<image>`` marker
sits at most once in the conversation, in a user turn. The marker and one newline right
after it are cut out; the tokenizer puts its single image placeholder id there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

IMAGE_MARKER = "<image>"
USER, ASSISTANT = "user", "assistant"
ROLES: dict[str, str] = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT}


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


def parse_conversation(turns: Sequence[tuple[str, str]]) -> list[Turn]:
  """Validates (role, text) turns and cuts the image marker out of its user turn.

  Raises ValueError for an empty conversation, an unknown role, turns that do not
  alternate user, assistant, ... from the user, or a misplaced or repeated marker.
  """
  if not turns:
    raise ValueError("a conversation needs at least one turn")
  markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
  if markers > 1:
    raise ValueError(f"the image marker {IMAGE_MARKER!r} appears {markers} times in the "
                     "conversation; it may appear at most once")
  parsed = []
  for i, (role, text) in enumerate(turns):
    name = ROLES.get(role)
    if name is None:
      raise ValueError(f"turn {i} has the unknown role {role!r}; expected one of "
                       f"{sorted(ROLES)}")
    expected = USER if i % 2 == 0 else ASSISTANT
    if name != expected:
      raise ValueError(f"turn {i} is {role!r} but turns must alternate user, assistant, ... "
                       "starting with the user")
    if IMAGE_MARKER not in text:
      parsed.append(Turn(name, text))
    elif name == ASSISTANT:
      raise ValueError(f"turn {i}: the image marker {IMAGE_MARKER!r} is in an assistant "
                       "turn; it belongs in a user turn")
    else:
      before, _, after = text.partition(IMAGE_MARKER)
      parsed.append(Turn(name, before, after.removeprefix("\n"), has_image=True))
  return parsed


def question_with_image(question: str, image_first: bool) -> str:
  """The user text of a single-image question: the marker before or after it."""
  return f"{IMAGE_MARKER}\n{question}" if image_first else f"{question}{IMAGE_MARKER}"


def check_image_count(ids: Sequence[int], image_id: int, turns: Sequence[Turn]) -> None:
  """Raises ValueError unless ``ids`` hold the image id once per marker: a text that
  spells out the image token itself would make the spliced image land twice."""
  expected = sum(t.has_image for t in turns)
  found = sum(1 for i in ids if i == image_id)
  if found != expected:
    raise ValueError(f"the conversation gives {found} image placeholder ids (id {image_id}) "
                     f"for {expected} {IMAGE_MARKER!r} markers: does a text contain the "
                     "image token itself?")


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
