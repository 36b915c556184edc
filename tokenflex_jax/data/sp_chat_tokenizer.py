"""An LLM's sentencepiece ``.model`` behind `chat.ChatTokenizer`, in its chat template.

Two templates, chosen by name (texts shown as ``{...}``, texts trimmed):

* "llama2": ``<s>[INST] {text} [/INST] {reply} </s>`` per exchange; "[INST]" and
  "[/INST]" are encoded as text (they are not pieces of Llama 2's vocabulary).
* "gemma": ``<bos>`` then per turn ``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` with
  the roles "user" and "model"; the two turn markers must be single pieces.

Every text is encoded on its own and the ids are joined (`conversation.format_ids`), as
LLaVA's training code does, so a model that adds a dummy-prefix space gives each text
its leading "▁". Meta's reference tokenizes ``[/INST] {reply} </s>`` with a space piece
before ``</s>``; this leaves it out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm

from tokenflex_jax.data import conversation
from tokenflex_jax.data.conversation import IdTemplate

TEMPLATES = ("llama2", "gemma")
LLAMA2_OPEN, LLAMA2_CLOSE = "[INST]", "[/INST]"
GEMMA_START, GEMMA_END = "<start_of_turn>", "<end_of_turn>"


class SentencePieceChatTokenizer:
  """A sentencepiece model (Llama 2 or Gemma style) plus its chat template.

  ``image_token`` must be a single piece of the model (e.g. a user-defined symbol
  "<image>"). A model without a pad piece pads with its unk id (never with eos, which
  the loss mask must see).
  """

  def __init__(self, model_path: str, template: str = "llama2", image_token: str = "<image>"):
    if template not in TEMPLATES:
      raise ValueError(f"unknown chat template {template!r} for a sentencepiece tokenizer "
                       f"(config.tokenizer.template); expected one of {TEMPLATES}")
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"no sentencepiece model at {model_path}")
    self.model_path, self.template, self.image_token = model_path, template, image_token
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    sp = self._sp
    if sp.bos_id() < 0 or sp.eos_id() < 0:
      raise ValueError(f"{model_path} has no bos or eos piece")
    self._image_id = self._piece_id(image_token, "the image placeholder")
    self._pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()
    specials = {self._image_id}
    if template == "llama2":
      self._template = IdTemplate(
          begin=(), user_open=(sp.bos_id(), *self.encode(LLAMA2_OPEN)),
          user_close=tuple(self.encode(LLAMA2_CLOSE)), assistant_open=(),
          end_of_turn=sp.eos_id(), assistant_close=(), trim=True)
    else:
      start = self._piece_id(GEMMA_START, "the gemma template's turn start")
      end = self._piece_id(GEMMA_END, "the gemma template's end of turn")
      specials |= {start, end}
      newline = tuple(self.encode("\n"))
      self._template = IdTemplate(
          begin=(sp.bos_id(),), user_open=(start, *self.encode("user\n")),
          user_close=(end, *newline), assistant_open=(start, *self.encode("model\n")),
          end_of_turn=end, assistant_close=newline, trim=True)
    self._eos_id = self._template.end_of_turn
    self._stop = {self._eos_id, sp.eos_id()}
    self._drop = specials | {self._pad_id, sp.bos_id()}

  def _piece_id(self, piece: str, what: str) -> int:
    """The id of ``piece``; ValueError naming the file when it is not a single piece."""
    i = self._sp.piece_to_id(piece)
    if i == self._sp.unk_id() or self._sp.id_to_piece(i) != piece:
      raise ValueError(f"{self.model_path} has no piece {piece!r} ({what}); it must be a "
                       "single piece of the model, e.g. a user-defined symbol")
    return i

  def __getstate__(self):  # grain pickles transforms; reload the model on the other side
    return {"model_path": self.model_path, "template": self.template,
            "image_token": self.image_token}

  def __setstate__(self, state):
    self.__init__(**state)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    """The template's end of turn (llama2: </s>; gemma: <end_of_turn>)."""
    return self._eos_id

  @property
  def image_id(self) -> int:
    return self._image_id

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids, without bos/eos."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Piece ids -> text: stops at the first end of turn or eos, drops special ids."""
    kept = conversation.text_ids(ids, self._stop, self._drop)
    return self._sp.decode(kept)

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]) in the chat template; the mask is True on
    the assistant replies and their end-of-turn ids. See `conversation` for the rules."""
    return conversation.format_ids(self._template, conversation.parse_conversation(turns),
                                   self.encode, self._image_id)

  def prompt_ids(self, question: str, image_first: bool = True) -> list[int]:
    """One user turn with the image and ``question``, ready for the model's reply."""
    turn = (conversation.USER, conversation.question_with_image(question, image_first))
    return self.conversation_ids([turn])[0]

  def answer_ids(self, answer: str) -> list[int]:
    """[*answer, end_of_turn]: what the model is trained to write after the prompt."""
    return [*self.encode(answer.strip()), self._eos_id]
