"""The project's sentencepiece tokenizer and its chat template.

A prompt is ``<bos> <user> <image> question <assistant>``; the model then writes
``answer <eos>``. The ``<image>`` token marks where the visual tokens are spliced in.
A conversation repeats ``<user> text <assistant> answer <eos>`` after one ``<bos>``.
`Tokenizer` implements `chat.ChatTokenizer`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm
from etils import epath

from tokenflex_jax import paths

from tokenflex_jax.data import conversation, scenes
from tokenflex_jax.data.chat_base import IdTemplateTokenizer, SpecialIds

IMAGE_TOKEN = "<image>"
USER_TOKEN = "<user>"
ASSISTANT_TOKEN = "<assistant>"
SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(model_path: str, texts: Iterable[str], vocab_size: int = 256) -> None:
  """Trains a BPE model on ``texts`` and writes it to ``model_path`` atomically.

  Deterministic: the same texts give a byte-identical file. ``vocab_size`` is an upper
  bound (``hard_vocab_limit=False``): a small corpus yields fewer pieces. BPE, not
  unigram: on the suite's small corpus BPE gives every word one piece (short prompts).
  """
  writer = io.BytesIO()  # not model_prefix: the model file would record that path
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_writer=writer, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(SPECIAL_TOKENS), num_threads=1,
      shuffle_input_sentence=False, minloglevel=2)
  paths.write_atomically(model_path, writer.getvalue())


class Tokenizer(IdTemplateTokenizer):
  """A loaded sentencepiece model plus the chat template's special ids.

  ``prompt_ids(q)`` is ``[bos, user, image, *q, assistant]`` (with ``image_first=False``
  the image follows ``q``), ``answer_ids(a)`` is ``[*a, eos]`` and ``conversation_ids``
  gives ``[bos, user, *q1, assistant, *a1, eos, user, ...]``: for
  ``[("user", "<image>\\nq"), ("assistant", a)]`` that is ``prompt_ids(q) + answer_ids(a)``.
  """

  def __init__(self, model_path: str):
    sp = self._load(model_path, "tokenizer model")
    ids = [sp.piece_to_id(t) for t in SPECIAL_TOKENS]
    if any(i == sp.unk_id() for i in ids):
      raise ValueError(f"{model_path} lacks the special tokens {SPECIAL_TOKENS}")
    image_id, self._user_id, self._assistant_id = ids
    template = conversation.IdTemplate(
        begin=(sp.bos_id(),), user_open=(self._user_id,), user_close=(),
        assistant_open=(self._assistant_id,), end_of_turn=sp.eos_id(), assistant_close=(),
        trim=False)
    special = SpecialIds(vocab_size=sp.get_piece_size(), pad=sp.pad_id(), bos=sp.bos_id(),
                         eos=sp.eos_id(), image=image_id, stop=frozenset({sp.eos_id()}),
                         drop=frozenset({sp.pad_id(), sp.bos_id(), *ids}))
    super().__init__({"model_path": model_path}, template, special)

  @property
  def user_id(self) -> int:
    return self._user_id

  @property
  def assistant_id(self) -> int:
    return self._assistant_id


def ensure_tokenizer(model_path: str,
                     families: tuple[str, ...] = scenes.DEFAULT_FAMILIES) -> Tokenizer:
  """Loads ``model_path``, first training it on the text of the scene suite's
  ``families`` if it is missing."""
  if not epath.Path(model_path).exists():
    train_tokenizer(model_path, scenes.corpus_texts(families))
  return Tokenizer(model_path)
