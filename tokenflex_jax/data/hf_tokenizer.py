"""A Hugging Face ``tokenizer.json`` behind `chat.ChatTokenizer`, in its LLM's chat template.

By default (``template=""``) the tokenizer's own Jinja ``chat_template`` is rendered
(`jinja_template`: what ``apply_chat_template`` renders, the replies found in the text),
with the image token written where the marker was. For a file without one, two
hand-written templates can be chosen by name (texts shown as ``{...}``):

* "chatml" (Qwen2, Qwen2.5): ``<|im_start|>system\\n{system}<|im_end|>\\n`` then per turn
  ``<|im_start|>{role}\\n{text}<|im_end|>\\n``; the system prompt defaults to Qwen2.5's.
* "llama3": ``<|begin_of_text|>`` then per turn
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>``, texts trimmed.

With these a conversation is rendered to the text the model's Jinja chat template would
render and encoded in one go, except that the image placeholder id is spliced in where
the marker was, so the ids are ``apply_chat_template``'s. Either way the loss mask comes
from the tokens' character offsets: a token is the assistant's when it overlaps a reply
or its end of turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import tokenizers
from etils import epath

from tokenflex_jax.data import conversation, jinja_template
from tokenflex_jax.data.chat_base import ChatTokenizerBase, SpecialIds
from tokenflex_jax.data.conversation import ASSISTANT, SYSTEM, USER, Turn
from tokenflex_jax.errors import ConfigError, InputError, MissingInputError

QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TEMPLATES = ("chatml", "llama3")  # hand-written; "" is the file's own chat_template
# Padding for a tokenizer_config.json that names no pad token: the first of these it has.
PAD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "<pad>", "<unk>")


@dataclasses.dataclass(frozen=True)
class TextTemplate:
  """A chat template whose turns are ``header_start + role + header_end + text +
  end_of_turn + separator`` after an optional bos token."""
  name: str
  header_start: str
  header_end: str
  end_of_turn: str
  separator: str
  special_tokens: tuple[str, ...]  # must be single added tokens of the tokenizer
  begins_with_bos: bool
  bos: str  # used when tokenizer_config.json names none
  pad: str  # used when tokenizer_config.json names none
  system_prompt: str  # the default; "" for no system turn
  trim: bool


CHATML = TextTemplate(
    name="chatml", header_start="<|im_start|>", header_end="\n", end_of_turn="<|im_end|>",
    separator="\n", special_tokens=("<|im_start|>", "<|im_end|>"), begins_with_bos=False,
    bos="", pad="<|endoftext|>", system_prompt=QWEN25_SYSTEM_PROMPT, trim=False)
LLAMA3 = TextTemplate(
    name="llama3", header_start="<|start_header_id|>", header_end="<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>", separator="",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    begins_with_bos=True, bos="<|begin_of_text|>", pad="<|end_of_text|>", system_prompt="",
    trim=True)


def text_template(name: str) -> TextTemplate:
  """The template called ``name`` ("chatml" or "llama3")."""
  if name == "chatml":
    return CHATML
  if name == "llama3":
    return LLAMA3
  raise ConfigError(f"unknown chat template {name!r} for a Hugging Face tokenizer "
                   f"(config.tokenizer.template); expected '' (the tokenizer's own "
                   f"chat_template) or one of {TEMPLATES}")


@dataclasses.dataclass(frozen=True)
class Rendered:
  """A conversation as text: the reply spans [start, end) in characters, each covering
  the reply and its end-of-turn token, and where each image id goes (in order)."""
  text: str
  replies: tuple[tuple[int, int], ...]
  image_at: tuple[int, ...]


def render(template: TextTemplate, turns: Sequence[Turn], system_prompt: str,
           bos: str) -> Rendered:
  """Parsed turns -> the text the model's chat template renders; a conversation that ends
  with a user turn gets the assistant header (the generation prompt). A first system turn
  takes the place of ``system_prompt``."""
  t = template
  if turns[0].role == SYSTEM:
    system_prompt, turns = turns[0].text, turns[1:]
  text = bos if t.begins_with_bos else ""
  if system_prompt:
    system = system_prompt.strip() if t.trim else system_prompt
    text += f"{t.header_start}system{t.header_end}{system}{t.end_of_turn}{t.separator}"
  replies, image_at = [], []
  for turn in turns:
    turn = turn.trimmed() if t.trim else turn
    text += f"{t.header_start}{turn.role}{t.header_end}"
    if turn.role == USER:
      for k, piece in enumerate(turn.texts):
        if k:
          image_at.append(len(text))
        text += piece
      text += t.end_of_turn + t.separator
    else:
      start = len(text)
      text += turn.text + t.end_of_turn
      replies.append((start, len(text)))
      text += t.separator
  if turns[-1].role == USER:
    text += f"{t.header_start}{ASSISTANT}{t.header_end}"
  return Rendered(text, tuple(replies), tuple(image_at))


def _in_replies(start: int, end: int, replies: Sequence[tuple[int, int]]) -> bool:
  """Whether the characters [start, end) of a token overlap a reply span."""
  if start == end:
    return any(s <= start < e for s, e in replies)
  return any(start < e and end > s for s, e in replies)


def read_tokenizer_config(tokenizer_json: str) -> dict:
  """The tokenizer_config.json beside ``tokenizer_json``, or {} when there is none."""
  path = epath.Path(tokenizer_json).parent / "tokenizer_config.json"
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def _config_token(config: dict, key: str) -> str:
  """A token named in tokenizer_config.json: a string, {"content": ...} or absent ("")."""
  value = config.get(key)
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else ""


class HFTokenizer(ChatTokenizerBase):
  """A ``tokenizers`` tokenizer.json plus one LLM chat template and an image token.

  ``path`` is the tokenizer.json or its folder; a tokenizer_config.json beside it may name
  the bos, eos and pad tokens and hold the chat template. ``template`` "" renders that
  template (`jinja_template`); "chatml" or "llama3" a hand-written one. ``system_prompt``
  None takes the template's default (chatml: Qwen2.5's; llama3: none; the file's own: its
  own), "" leaves the system turn out of the hand-written ones, and a text is the system
  turn of every conversation that has none. ``image_token`` must be one id of the
  tokenizer (e.g. "<|image_pad|>" in Qwen2-VL-style vocabularies).
  ``vocab_size`` is one more than the largest id (added tokens included); ``bos_id`` is
  the config's bos token (llama3: <|begin_of_text|>) or None; ``eos_id`` is the
  template's end of turn (<|im_end|>, <|eot_id|>, ...); decoding also stops at the
  config's eos.
  """

  def __init__(self, path: str, template: str = "", image_token: str = "<|image_pad|>",
               system_prompt: str | None = None):
    args = dict(path=path, template=template, image_token=image_token,
                system_prompt=system_prompt)
    self.path = os.path.join(path, "tokenizer.json") if epath.Path(path).is_dir() else path
    if not epath.Path(self.path).is_file():
      raise MissingInputError(f"no tokenizer.json at {path}")
    self._tok = tokenizers.Tokenizer.from_str(epath.Path(self.path).read_text())  # or gs://
    config = read_tokenizer_config(self.path)
    added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    self._image_token = image_token
    if template:
      self._jinja, self._template = None, text_template(template)
      end_of_turn, pad, trim = self._hand_written(config, added, system_prompt)
    else:
      self._template = None
      end_of_turn, pad, trim = self._own_template(config, added, system_prompt)
    eos_id = added[end_of_turn]
    image_id = self._token_id(image_token, "the image placeholder", added)
    pad_id = self._token_id(pad, "padding: name a pad_token in tokenizer_config.json", added)
    if image_id in (eos_id, pad_id):
      raise InputError(f"image token {image_token!r} is also the end-of-turn or pad token")
    if eos_id == pad_id:
      raise InputError(f"{self.path}: the end of turn {end_of_turn!r} is also the pad token")
    config_eos = self._tok.token_to_id(_config_token(config, "eos_token"))
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    super().__init__(args, SpecialIds(
        vocab_size=max(self._tok.get_vocab(with_added_tokens=True).values()) + 1,
        pad=pad_id, bos=self._tok.token_to_id(self._bos) if self._bos else None,
        eos=eos_id, image=image_id,
        stop=frozenset({eos_id} | ({config_eos} if config_eos is not None else set())),
        drop=frozenset(special | {pad_id, image_id})), trim)

  def _hand_written(self, config: dict, added: dict[str, int], system_prompt: str | None
                    ) -> tuple[str, str, bool]:
    """Checks the named template's tokens; sets its system prompt and bos. Returns (end
    of turn, pad token, whether texts are trimmed)."""
    t = self._template
    for token in t.special_tokens:
      if token not in added:
        raise InputError(f"{self.path} has no added token {token!r}, which the "
                         f"{t.name!r} chat template needs")
    self._system = t.system_prompt if system_prompt is None else system_prompt
    self._bos = _config_token(config, "bos_token") or t.bos
    if t.begins_with_bos and self._bos not in added:
      raise InputError(f"{self.path} has no added token {self._bos!r} (bos), which the "
                       f"{t.name!r} chat template needs")
    return t.end_of_turn, _config_token(config, "pad_token") or t.pad, t.trim

  def _own_template(self, config: dict, added: dict[str, int], system_prompt: str | None
                    ) -> tuple[str, str, bool]:
    """Compiles the file's own chat template (`jinja_template`); sets the system turn
    added to conversations and bos. Returns (end of turn, pad token, trimmed)."""
    source = jinja_template.find_chat_template(self.path, config)
    if source is None:
      raise ConfigError(f"{self.path} has no chat_template (in tokenizer_config.json or "
                        f"chat_template.jinja); set config.tokenizer.template to one of "
                        f"{TEMPLATES}")
    specials = {key: _config_token(config, key) for key in
                ("bos_token", "eos_token", "unk_token", "pad_token")}
    special_strings = [t.content for t in self._tok.get_added_tokens_decoder().values()
                       if t.special]
    self._jinja = jinja_template.JinjaChatTemplate(
        source, {k: v for k, v in specials.items() if v}, special_strings, self.path)
    self._system = system_prompt or None
    self._bos = specials["bos_token"]
    pad = specials["pad_token"] or next((t for t in PAD_CANDIDATES if t in added), "")
    return self._jinja.end_of_turn, pad, self._jinja.trims

  @property
  def template_name(self) -> str:
    """The hand-written template's name ("chatml", "llama3"); "" for the file's own."""
    return self._template.name if self._template else ""

  @property
  def system_prompt(self) -> str | None:
    """The system turn added to conversations without one (None: none added)."""
    return self._system

  @property
  def image_token(self) -> str:
    return self._image_token

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def _token_id(self, token: str, what: str, added: dict[str, int]) -> int:
    """The single id of ``token``; ValueError naming the file when it has none."""
    i = self._tok.token_to_id(token) if token else None
    if i is None:
      examples = ", ".join(repr(t) for t in list(added)[:12])
      raise InputError(f"{self.path} has no token {token!r} ({what}); it must be a single "
                       f"id of the tokenizer, e.g. one of its added tokens: {examples}")
    return i

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without bos/eos; special tokens spelled out in the text are parsed."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def _ids_to_text(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def conversation_ids(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(role, text) turns -> (ids [L], mask [L]) in the chat template; the mask is True on
    the assistant replies and their end-of-turn tokens. See `conversation` for the rules."""
    parsed = conversation.parse_conversation(turns)
    if self._jinja is not None:
      return self._jinja_ids(parsed)
    r = render(self._template, parsed, self._system, self._bos)
    bounds = (0, *r.image_at, len(r.text))
    pieces = [(a, r.text[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    ids, mask = [], []
    for k, (offset, text) in enumerate(pieces):
      if k:  # an image placeholder sits between two pieces
        ids.append(self.image_id)
        mask.append(False)
      encoding = self._tok.encode(text, add_special_tokens=False)
      ids.extend(encoding.ids)
      mask.extend(_in_replies(offset + s, offset + e, r.replies) for s, e in encoding.offsets)
    conversation.check_image_count(ids, self.image_id, parsed)
    return ids, mask

  def _jinja_ids(self, parsed: Sequence[Turn]) -> tuple[list[int], list[bool]]:
    """Parsed turns -> (ids, mask) through the file's own chat template."""
    messages = [{"role": t.role,
                 "content": t.joined(self._image_token)}
                for t in parsed]
    if self._system and parsed[0].role != SYSTEM:
      messages.insert(0, {"role": SYSTEM, "content": self._system})
    rendered = self._jinja.render(messages, add_generation_prompt=parsed[-1].role == USER)
    encoding = self._tok.encode(rendered.text, add_special_tokens=False)
    mask = [_in_replies(s, e, rendered.replies) for s, e in encoding.offsets]
    conversation.check_image_count(encoding.ids, self.image_id, parsed)
    return list(encoding.ids), mask
