"""The project's sentencepiece tokenizer and its chat template.

A prompt is ``<bos> <user> <image> question <assistant>``; the model then writes
``answer <eos>``. The ``<image>`` token marks where the visual tokens are spliced in.
A conversation repeats ``<user> text <assistant> answer <eos>`` after one ``<bos>``.
`Tokenizer` implements `chat.ChatTokenizer`.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from tokenflex_jax.data import conversation, scenes

IMAGE_TOKEN = "<image>"
USER_TOKEN = "<user>"
ASSISTANT_TOKEN = "<assistant>"
SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(model_path: str, texts: Iterable[str], vocab_size: int = 256) -> None:
  """Trains a BPE model on ``texts`` and writes it to ``model_path`` atomically.

  Deterministic: the same texts give a byte-identical file. ``vocab_size`` is an upper
  bound (``hard_vocab_limit=False``): a small corpus yields fewer pieces. BPE, not
  unigram: on the suite's ~30 sentences unigram stops at ~60 sub-word pieces, while BPE
  gives every word one piece (short prompts).
  """
  writer = io.BytesIO()  # not model_prefix: the model file would record that path
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_writer=writer, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(SPECIAL_TOKENS), num_threads=1,
      shuffle_input_sentence=False, minloglevel=2)
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(writer.getvalue())
    os.replace(tmp, model_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class Tokenizer:
  """A loaded sentencepiece model plus the chat template's special ids."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"no tokenizer model at {model_path}")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = [self._sp.piece_to_id(t) for t in SPECIAL_TOKENS]
    if any(i == self._sp.unk_id() for i in ids):
      raise ValueError(f"{model_path} lacks the special tokens {SPECIAL_TOKENS}")
    self._image_id, self._user_id, self._assistant_id = ids
    self._skip = {self.pad_id, self.bos_id, *ids}
    self._template = conversation.IdTemplate(
        begin=(self.bos_id,), user_open=(self._user_id,), user_close=(),
        assistant_open=(self._assistant_id,), end_of_turn=self.eos_id, assistant_close=(),
        trim=False)

  def __getstate__(self):  # grain pickles transforms; reload the model on the other side
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_path"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def image_id(self) -> int:
    return self._image_id

  @property
  def user_id(self) -> int:
    return self._user_id

  @property
  def assistant_id(self) -> int:
    return self._assistant_id

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids, without bos/eos."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Piece ids -> text: stops at the first eos, drops pad, bos and special ids."""
    kept = conversation.text_ids(ids, (self.eos_id,), self._skip)
    return self._sp.decode(kept)

  def prompt_ids(self, question: str, image_first: bool = True) -> list[int]:
    """[bos, user, image, *question, assistant], or with the image after the question."""
    text = self.encode(question)
    body = [self.image_id, *text] if image_first else [*text, self.image_id]
    return [self.bos_id, self.user_id, *body, self.assistant_id]

  def answer_ids(self, answer: str) -> list[int]:
    """[*answer, eos]: what the model is trained to write after the prompt."""
    return [*self.encode(answer), self.eos_id]

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]), mask True on each answer and its eos.

    ``[bos, user, *q1, assistant, *a1, eos, user, ...]``: for ``[("user", "<image>\\nq"),
    ("assistant", a)]`` that is ``prompt_ids(q) + answer_ids(a)``. See `conversation`.
    """
    return conversation.format_ids(self._template, conversation.parse_conversation(turns),
                                   self.encode, self.image_id)


def ensure_tokenizer(model_path: str) -> Tokenizer:
  """Loads ``model_path``, first training it on the scene suite's text if it is missing."""
  if not os.path.exists(model_path):
    train_tokenizer(model_path, scenes.corpus_texts())
  return Tokenizer(model_path)
