"""The interface of every tokenizer behind the VLM, and `load_tokenizer` to pick one.

Three kinds implement `ChatTokenizer`: the project's own sentencepiece model
(`tokenizer.Tokenizer`), an LLM's sentencepiece ``.model``
(`sp_chat_tokenizer.SentencePieceChatTokenizer`, templates llama2 | gemma) and an LLM's
Hugging Face ``tokenizer.json`` (`hf_tokenizer.HFTokenizer`, templates chatml | llama3).
Their common part (special ids, pickling, decoding, prompt and answer ids) is
`chat_base.ChatTokenizerBase`.
Conversations are (role, text) turns; ``IMAGE_MARKER`` in a user text marks where the
image placeholder id goes (rules in `conversation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tokenflex_jax.data import conversation, tokenizer
from tokenflex_jax.data.hf_tokenizer import HFTokenizer
from tokenflex_jax.data.sp_chat_tokenizer import SentencePieceChatTokenizer
from tokenflex_jax.errors import ConfigError

IMAGE_MARKER = conversation.IMAGE_MARKER
KINDS = ("project", "sentencepiece", "hf")


@runtime_checkable
class ChatTokenizer(Protocol):
  """Text <-> ids in one LLM's chat template, an image placeholder id per image."""

  @property
  def vocab_size(self) -> int:
    """Ids are in [0, vocab_size)."""

  @property
  def pad_id(self) -> int:
    """Fills the tail of a padded sequence."""

  @property
  def eos_id(self) -> int:
    """The end of an assistant turn: where generation stops."""

  @property
  def image_id(self) -> int:
    """The placeholder the visual tokens are spliced in at."""

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos or template tokens."""

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text: stops at the end of turn (eos), drops special ids."""

  def prompt_ids(self, question: str, image_first: bool = True) -> list[int]:
    """One user turn with the image placeholder and ``question`` (the image before or
    after it), ending with the assistant header: ready for generation."""

  def answer_ids(self, answer: str) -> list[int]:
    """The reply's ids plus the end of turn: what follows `prompt_ids` in training."""

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]): True exactly on the assistant replies
    and their end-of-turn ids. A conversation ending with a user turn gets the assistant
    header. Raises ValueError on bad roles, order or image markers."""


def load_tokenizer(kind: str, path: str, template: str = "", image_token: str = "",
                   system_prompt: str | None = None) -> ChatTokenizer:
  """The tokenizer of ``config.tokenizer`` (kind, path, template, image_token).

  kind "project": the project's model at ``path`` (its template and "<image>" are fixed:
  ``template`` and ``image_token`` must be "" or those); "sentencepiece": an LLM's .model
  with template "llama2" or "gemma"; "hf": a tokenizer.json (or its folder) with template
  "chatml" or "llama3". ``system_prompt`` (hf only): None for the template's default.
  """
  if kind == "project":
    if template not in ("", "project") or image_token not in ("", tokenizer.IMAGE_TOKEN):
      raise ConfigError(f"config.tokenizer.kind='project' has its own template and image "
                       f"token {tokenizer.IMAGE_TOKEN!r}; got config.tokenizer.template="
                       f"{template!r}, config.tokenizer.image_token={image_token!r}")
    if system_prompt is not None:
      raise ConfigError("the project tokenizer has no system prompt; leave "
                       "config.tokenizer.system_prompt unset")
    return tokenizer.Tokenizer(path)
  if kind not in ("sentencepiece", "hf"):
    raise ConfigError(f"unknown config.tokenizer.kind {kind!r}; expected one of {KINDS}")
  if not image_token:
    raise ConfigError(f"config.tokenizer.kind={kind!r} needs config.tokenizer.image_token, "
                     "a single-id token of the tokenizer that marks the image")
  if kind == "sentencepiece":
    if system_prompt is not None:
      raise ConfigError("the sentencepiece templates (llama2, gemma) take no system prompt; "
                       "leave config.tokenizer.system_prompt unset")
    return SentencePieceChatTokenizer(path, template, image_token)
  return HFTokenizer(path, template, image_token, system_prompt)
