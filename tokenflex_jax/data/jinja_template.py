"""A tokenizer's own Jinja chat template, rendered the way transformers renders it, with
the assistant replies found in the rendered text.

Every Hugging Face LLM ships its chat template as Jinja source: the ``chat_template`` of
its ``tokenizer_config.json`` (a string, or a list of named templates of which
"default" is taken) or a ``chat_template.jinja`` file beside it. `JinjaChatTemplate`
compiles it in the sandbox transformers uses (``ImmutableSandboxedEnvironment`` with
``trim_blocks``, ``lstrip_blocks`` and loop controls; ``raise_exception``,
``strftime_now`` and transformers' ``tojson``; ``{% generation %}`` blocks render their
body) and renders ``messages``, ``add_generation_prompt`` and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...), so the text, and so the ids, are
``apply_chat_template``'s.

Where the replies are: the conversation is rendered a second time with every assistant
reply replaced by a sentinel (``\\ue000<k>\\ue001``, private-use characters that no
filter trims). The text between the sentinels is the template's own, so the real
rendering is walked piece by piece and each reply is what lies between two pieces (the
template may have trimmed it, nothing else). A reply's span also covers the special
token that closes it (the template's end of turn, e.g. ``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``, ``</s>``), which the model must learn to write.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from etils import epath

from tokenflex_jax.data.conversation import ASSISTANT, ConversationError
from tokenflex_jax.errors import InputError

_SENTINEL = re.compile("\ue000([0-9]+)\ue001")


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tags): the
  body is rendered as it is; the replies are found from the sentinels instead."""
  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
  """Jinja source -> a template in transformers' sandboxed environment."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
  return env.from_string(source)


def find_chat_template(tokenizer_json: str, config: Mapping[str, Any]) -> str | None:
  """The chat template shipped with ``tokenizer_json``: ``chat_template.jinja`` beside
  it, else ``config["chat_template"]`` (tokenizer_config.json: a string, or a list of
  {"name", "template"} of which "default" is taken); None when there is none."""
  path = epath.Path(tokenizer_json).parent / "chat_template.jinja"
  if path.is_file():
    return path.read_text()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template.strip() else None


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  """A rendered conversation and its replies' spans [start, end) in characters (each
  with its closing special token)."""
  text: str
  replies: tuple[tuple[int, int], ...]


class JinjaChatTemplate:
  """A compiled chat template; ``special_tokens`` are the template's variables
  (``{"bos_token": "<s>", ...}``); ``added_tokens`` the tokenizer's special strings, of
  which one must close every assistant reply (`end_of_turn`).

  Raises `InputError` naming ``where`` (the file) if the source does not compile, or if
  no special token follows a reply.
  """

  def __init__(self, source: str, special_tokens: Mapping[str, str],
               added_tokens: Collection[str], where: str):
    self._where = where
    try:
      self._template = compile_template(source)
    except jinja2.exceptions.TemplateError as e:
      raise InputError(f"{where}: the chat template does not compile: {e}") from None
    self._special = dict(special_tokens)
    self._added = sorted(added_tokens, key=len, reverse=True)  # longest match first
    probe = [{"role": "user", "content": "Hi"}, {"role": ASSISTANT, "content": " A "}]
    pieces = _SENTINEL.split(self._render(probe, False, sentinels=True))
    after = pieces[2] if len(pieces) == 3 else ""
    closing = next((t for t in self._added if after.startswith(t)), None)
    if closing is None:
      raise InputError(f"{where}: the chat template puts no special token right after an "
                       f"assistant reply (it continues {after[:40]!r}), so its end of turn "
                       "is unknown")
    self.end_of_turn: str = closing
    # Whether the template trims replies (llama3, gemma): then so is a bare answer.
    self.trims: bool = self.render(probe, False).text.count(" A ") == 0

  def _render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
              sentinels: bool = False) -> str:
    if sentinels:
      k = iter(range(len(messages)))
      messages = [dict(m, content=f"\ue000{next(k)}\ue001") if m["role"] == ASSISTANT
                  else m for m in messages]
    try:
      return self._template.render(messages=list(messages), tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **self._special)
    except jinja2.exceptions.TemplateError as e:
      raise ConversationError("refused by the chat template",
                              f"the chat template of {self._where} refuses the "
                              f"conversation: {e}") from None

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
             ) -> RenderedChat:
    """messages [{"role", "content"}] -> the rendered text and the replies' spans.
    `ConversationError` if the template raises, or changes a reply beyond trimming it."""
    text = self._render(messages, add_generation_prompt)
    pieces = _SENTINEL.split(self._render(messages, add_generation_prompt, sentinels=True))
    templated, order = pieces[0::2], [int(k) for k in pieces[1::2]]
    replies = [m["content"] for m in messages if m["role"] == ASSISTANT]
    if not text.startswith(templated[0]) or sorted(order) != list(range(len(replies))):
      raise self._lost("the replies")
    pos, spans = len(templated[0]), []
    for k, (index, after) in enumerate(zip(order, templated[1:])):
      last = k == len(order) - 1
      end = len(text) - len(after) if last else text.find(after, pos) if after else pos
      if end < pos or (last and not text.endswith(after)):
        raise self._lost(f"reply {index}")
      if text[pos:end].strip() != replies[index].strip():
        raise self._lost(f"reply {index} (the template changes more than its whitespace)")
      closing = self.end_of_turn if after.startswith(self.end_of_turn) else ""
      spans.append((pos, end + len(closing)))
      pos = end + len(after)  # past the template's text up to the next reply
    return RenderedChat(text, tuple(spans))

  def _lost(self, what: str) -> ConversationError:
    return ConversationError("refused by the chat template",
                             f"cannot find {what} in the rendering of the chat template of "
                             f"{self._where}")
