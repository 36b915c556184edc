"""Conversations as (role, text) turns: parsing, the image marker, formatting over ids.

Every chat tokenizer (`chat.ChatTokenizer`) formats the same parsed turns in its own
template, so the rules live here once: roles are "user" and "assistant" (LLaVA's "human"
and "gpt" too), after an optional first "system" turn; turns alternate starting with the
user, and image markers sit in user turns only: ``<image>`` once per image, the images
taken in order (LLaVA, LLaVA-OneVision), or MMMU's ``<image k>``, naming image k of the
row (from 1), not both kinds in one conversation. Each marker and one newline right
after it are cut out; the tokenizer puts an image placeholder id there. The LLaVA
reader (`llava`) validates data rows by the same rules (`parse_turn`, `image_order`);
a broken rule raises `ConversationError`, whose ``reason`` names it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Sequence

from tokenflex_jax.errors import InputError

IMAGE_MARKER = "<image>"
# ``<image>`` or ``<image k>``; group 1 holds k.
MARKER = re.compile(r"<image(?: ([1-9][0-9]*))?>")
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES: dict[str, str] = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT,
                         "system": SYSTEM}


@dataclasses.dataclass(frozen=True)
class Turn:
  """One turn with its image markers cut out: ``texts`` t_0 .. t_m with image i between
  t_i and t_(i+1) (without an image, one text); ``refs`` per image: the k of its
  ``<image k>`` marker, or None for ``<image>``."""
  role: str
  texts: tuple[str, ...]
  refs: tuple[int | None, ...] = ()

  @property
  def images(self) -> int:
    return len(self.texts) - 1

  @property
  def text(self) -> str:
    """The whole text without its images (a system turn's or a reply's text)."""
    return "".join(self.texts)

  def joined(self, image: str) -> str:
    """The text with ``image`` (a template's image token) where each marker was."""
    return image.join(self.texts)

  def trimmed(self) -> Turn:
    """The turn as templates that trim their texts see it: whitespace at either end of
    the text goes, the images counting as text (so the whitespace beside them stays)."""
    if len(self.texts) == 1:
      return dataclasses.replace(self, texts=(self.texts[0].strip(),))
    return dataclasses.replace(self, texts=(self.texts[0].lstrip(), *self.texts[1:-1],
                                            self.texts[-1].rstrip()))


class ConversationError(InputError):
  """Turns that break the rules above; ``reason`` names the rule broken in a few words
  (what a reader of data rows counts skipped rows by), the message says where."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)

  def __reduce__(self):  # Picklable: grain's worker processes send errors back.
    return type(self), (self.reason, str(self))


def image_order(turns: Sequence[Turn], images: int) -> tuple[int, ...]:
  """Which of a row's ``images`` each image placeholder of ``turns`` shows, in order:
  ``<image>`` markers take the images one each in order (as many markers as images);
  ``<image k>`` markers name theirs (1 <= k <= images; one may be named twice). Raises
  `ConversationError` where they disagree."""
  refs = [ref for turn in turns for ref in turn.refs]
  if any(ref is None for ref in refs):
    if any(ref is not None for ref in refs):
      raise ConversationError("mixed image markers", f"both {IMAGE_MARKER!r} and "
                              "'<image k>' markers: use one kind per conversation")
    if len(refs) != images:
      reason = (f"no {IMAGE_MARKER} marker" if not refs else
                f"{IMAGE_MARKER} marker without an image" if not images else
                f"{IMAGE_MARKER} markers do not match the images")
      raise ConversationError(reason, f"{len(refs)} {IMAGE_MARKER!r} markers for {images} "
                              "image(s): one marker per image, in a user turn")
    return tuple(range(images))
  if not refs and images:
    raise ConversationError(f"no {IMAGE_MARKER} marker",
                            f"{images} image(s) but no {IMAGE_MARKER!r} marker in a user turn")
  for ref in refs:
    if ref > images:
      raise ConversationError("<image k> beyond the images",
                              f"'<image {ref}>' names image {ref} of {images}")
  return tuple(ref - 1 for ref in refs)


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
  pieces = MARKER.split(text)  # text, k or None, text, ...
  if len(pieces) == 1:
    return Turn(name, (text,))
  if name != USER:
    where = f"{'an' if name == ASSISTANT else 'a'} {name} turn"
    raise ConversationError(f"{IMAGE_MARKER} marker in {where}",
                            f"turn {i}: the image marker {IMAGE_MARKER!r} is in {where}; it "
                            "belongs in a user turn")
  texts = [pieces[0]] + [t.removeprefix("\n") for t in pieces[2::2]]
  refs = tuple(None if k is None else int(k) for k in pieces[1::2])
  return Turn(name, tuple(texts), refs)


def parse_conversation(turns: Sequence[tuple[str, str]]) -> list[Turn]:
  """Validates (role, text) turns and cuts the image markers out of its user turns.

  Raises `ConversationError` (a ValueError) for an empty conversation, markers of both
  kinds, or a turn that `parse_turn` rejects (unknown role, out of order, a marker in an
  assistant turn).
  """
  if not turns or (is_system(turns[0][0]) and len(turns) == 1):
    raise ConversationError("no turns", "a conversation needs at least one user turn")
  system_first = is_system(turns[0][0])
  parsed = [parse_turn(i, role, text, system_first) for i, (role, text) in enumerate(turns)]
  refs = [ref for turn in parsed for ref in turn.refs]
  if any(ref is None for ref in refs) and any(ref is not None for ref in refs):
    image_order(parsed, len(refs))  # raises "mixed image markers"
  return parsed


def question_with_image(question: str, image_first: bool) -> str:
  """The user text of a single-image question: the marker before or after it."""
  return f"{IMAGE_MARKER}\n{question}" if image_first else f"{question}{IMAGE_MARKER}"


def check_image_count(ids: Sequence[int], image_id: int, turns: Sequence[Turn]) -> None:
  """Raises `ConversationError` (a ValueError) unless ``ids`` hold the image id once per
  marker: a text that spells out the image token itself would make the spliced image
  land twice."""
  expected = sum(t.images for t in turns)
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
      for k, text in enumerate(turn.texts):
        if k:
          add([image_id])
        add(encode(text))
      add(template.user_close)
    else:
      add(template.assistant_open)
      add([*encode(turn.text), template.end_of_turn], loss=True)
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
