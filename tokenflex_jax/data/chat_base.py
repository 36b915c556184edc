"""What the chat tokenizers share: special ids, pickling, decoding, the one-question prompt.

`ChatTokenizerBase` is the common part of every `chat.ChatTokenizer`: its special ids
(`SpecialIds`), pickling as its constructor's arguments (grain pickles transforms into
worker processes, where the tokenizer file is loaded again), `decode` through
`conversation.text_ids`, and `prompt_ids` / `answer_ids` built on `conversation_ids`.
`IdTemplateTokenizer` adds a sentencepiece model whose chat template is a
`conversation.IdTemplate` (the project's model, `tokenizer.Tokenizer`, and an LLM's
``.model``, `sp_chat_tokenizer.SentencePieceChatTokenizer`). A subclass supplies only
what differs: how it loads its file and finds its ids, and its template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sentencepiece as spm
from etils import epath

from tokenflex_jax.errors import MissingInputError
from tokenflex_jax.data import conversation
from tokenflex_jax.data.conversation import IdTemplate


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """A tokenizer's ids in [0, vocab_size) that are not plain text.

  ``pad`` fills padded tails; ``bos`` begins a sequence (None: the tokenizer has none);
  ``eos`` ends an assistant turn (where generation stops); ``image`` is the placeholder
  the visual tokens are spliced in at. Decoding stops at the first id in ``stop`` and
  leaves out the ids in ``drop``.
  """
  vocab_size: int
  pad: int
  bos: int | None
  eos: int
  image: int
  stop: frozenset[int]
  drop: frozenset[int]


class ChatTokenizerBase:
  """The shared part of a chat tokenizer; subclasses define `encode`,
  `conversation_ids` and `_ids_to_text`, and call ``super().__init__`` once their ids
  are known.

  ``args`` are the constructor's keyword arguments (what a pickle keeps); ``trim``:
  whether the template strips the whitespace around its texts (answers included).
  """

  def __init__(self, args: Mapping[str, Any], ids: SpecialIds, trim: bool):
    self._args = dict(args)
    self._ids = ids
    self._trim = trim

  def __getstate__(self) -> dict[str, Any]:  # grain pickles transforms: reload the file
    return dict(self._args)

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(**state)

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size)."""
    return self._ids.vocab_size

  @property
  def pad_id(self) -> int:
    return self._ids.pad

  @property
  def bos_id(self) -> int | None:
    """The beginning-of-sequence id; None when the tokenizer has none."""
    return self._ids.bos

  @property
  def eos_id(self) -> int:
    """The template's end of turn: where generation stops."""
    return self._ids.eos

  @property
  def image_id(self) -> int:
    return self._ids.image

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos or template tokens."""
    raise NotImplementedError

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]) in the chat template (`chat.ChatTokenizer`)."""
    raise NotImplementedError

  def _ids_to_text(self, ids: list[int]) -> str:
    """Text ids (no stop or special ids left) -> text."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """Ids [L] -> text: stops at the first stop id (the end of turn), drops special ids."""
    return self._ids_to_text(conversation.text_ids(ids, self._ids.stop, self._ids.drop))

  def prompt_ids(self, question: str, image_first: bool = True) -> list[int]:
    """One user turn with the image and ``question`` (the image before or after it),
    ending with the assistant header: ready for the model's reply."""
    turn = (conversation.USER, conversation.question_with_image(question, image_first))
    return self.conversation_ids([turn])[0]

  def answer_ids(self, answer: str) -> list[int]:
    """[*answer, eos]: what the model is trained to write after `prompt_ids`."""
    text = answer.strip() if self._trim else answer
    return [*self.encode(text), self._ids.eos]


class IdTemplateTokenizer(ChatTokenizerBase):
  """A sentencepiece model in a chat template assembled from ids (`conversation.IdTemplate`):
  each text is encoded on its own and the ids are joined (`conversation.format_ids`).

  A subclass calls `_load` first (it sets ``model_path`` and the model), then
  ``super().__init__`` with its template.
  """

  model_path: str
  _sp: spm.SentencePieceProcessor

  def __init__(self, args: Mapping[str, Any], template: IdTemplate, ids: SpecialIds):
    super().__init__(args, ids, template.trim)
    self._template = template

  def _load(self, model_path: str, what: str) -> spm.SentencePieceProcessor:
    """Loads the model at ``model_path`` (local or gs://); FileNotFoundError "no {what}
    at ..." if absent."""
    path = epath.Path(model_path)
    if not path.exists():
      raise MissingInputError(f"no {what} at {model_path}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    return self._sp

  @property
  def sentencepiece(self) -> spm.SentencePieceProcessor:
    """The loaded model (its pieces, scores and kinds)."""
    return self._sp

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids, without bos/eos."""
    return self._sp.encode(text)

  def _ids_to_text(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]) in the template; the mask is True on the
    assistant replies and their end-of-turn ids. See `conversation` for the rules."""
    return conversation.format_ids(self._template, conversation.parse_conversation(turns),
                                   self.encode, self._ids.image)
