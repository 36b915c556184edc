"""A run's tokenizer as the files transformers' ``AutoTokenizer`` loads offline.

Writes ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, the image
token, the chat template) into an exported folder:

* kind "hf": the run's tokenizer.json as is; tokenizer_config.json is the source's with
  the chat template the run used: the file's own (from tokenizer_config.json or a
  ``chat_template.jinja`` beside it), or the Jinja form of the hand-written "chatml" /
  "llama3".
* kind "project" (the demo's sentencepiece BPE model): converted to a ``tokenizers`` BPE
  with the model's pieces and scores. Every text between special tokens is encoded on
  its own with its leading "▁", as `tokenizer.Tokenizer` encodes each text of a
  conversation, so a prompt rendered by the chat template has the ids of
  ``prompt_ids``. Its chat template is ``<s><user>{text}<assistant>{reply}</s>``, the
  image token written where the marker was.
* kind "sentencepiece" (an LLM's .model with the llama2 / gemma templates): refused; the
  LLM's own Hugging Face tokenizer (kind "hf") exports.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tokenizers
from etils import epath
from tokenizers import decoders, normalizers

from tokenflex_jax import paths
from tokenflex_jax.data import hf_tokenizer, jinja_template, tokenizer
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.errors import ConfigError

SPACE = "\u2581"  # sentencepiece's word-boundary mark
PROJECT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<assistant>{{ message['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' "
    "and system_prompt %}<|im_start|>system\n{{ system_prompt }}<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if system_prompt and messages[0]['role'] != 'system' %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system_prompt | trim }}<|eot_id|>"
    "{% endif %}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
  """What the rest of the export needs to know of the written tokenizer."""
  image_token: str
  chat_template: str
  template_name: str  # "project", "chatml", "llama3" or "own"


def write(tok: ChatTokenizer, out_dir: str) -> TokenizerFiles:
  """Writes the tokenizer files of ``tok`` into ``out_dir``; raises `ConfigError` for a
  kind that does not export."""
  os.makedirs(out_dir, exist_ok=True)
  if isinstance(tok, tokenizer.Tokenizer):
    return _project(tok, out_dir)
  if isinstance(tok, hf_tokenizer.HFTokenizer):
    return _hf(tok, out_dir)
  raise ConfigError(f"config.tokenizer.kind of {type(tok).__name__} does not export to "
                    "Hugging Face files; train with the LLM's own tokenizer.json "
                    "(config.tokenizer.kind='hf')")


def _bpe_merges(pieces: list[str], mergeable: set[str]) -> list[tuple[str, str]]:
  """The merges of a sentencepiece BPE model: each piece (in id order, which is its
  score order) made of two pieces of the model, every way it splits."""
  ids = {p: i for i, p in enumerate(pieces)}
  merges = []
  for piece in pieces:
    if piece not in mergeable:
      continue
    splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
              if piece[:k] in mergeable and piece[k:] in mergeable]
    merges += sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]]))
  return merges


def _project(tok: tokenizer.Tokenizer, out_dir: str) -> TokenizerFiles:
  sp = tok.sentencepiece
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  special = [p for i, p in enumerate(pieces)
             if sp.is_control(i) or sp.is_unknown(i) or p in tokenizer.SPECIAL_TOKENS]
  mergeable = set(pieces) - set(special)
  vocab = {p: i for i, p in enumerate(pieces)}
  unk = sp.id_to_piece(sp.unk_id())
  model = tokenizers.models.BPE(vocab=vocab, merges=_bpe_merges(pieces, mergeable),
                                unk_token=unk, fuse_unk=True)
  out = tokenizers.Tokenizer(model)
  # sentencepiece's nmt_nfkc normalisation, extra whitespace removed, then "▁" for
  # spaces and one in front of every text between special tokens.
  out.normalizer = normalizers.Sequence([
      normalizers.NFKC(), normalizers.Strip(),
      normalizers.Replace(tokenizers.Regex(" {2,}"), " "),
      normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
  out.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  out.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False)
                          for p in special])
  out.save(os.path.join(out_dir, "tokenizer.json"))
  name = lambda i: sp.id_to_piece(i)
  paths.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(sp.bos_id()),
      "eos_token": name(sp.eos_id()), "pad_token": name(sp.pad_id()), "unk_token": unk,
      "image_token": tokenizer.IMAGE_TOKEN, "extra_special_tokens": {
          "image_token": tokenizer.IMAGE_TOKEN},
      "padding_side": "left", "add_bos_token": False, "add_eos_token": False,
      "model_max_length": 1 << 30, "chat_template": PROJECT_TEMPLATE})
  return TokenizerFiles(tokenizer.IMAGE_TOKEN, PROJECT_TEMPLATE, "project")


def _hf(tok: hf_tokenizer.HFTokenizer, out_dir: str) -> TokenizerFiles:
  epath.Path(tok.path).copy(os.path.join(out_dir, "tokenizer.json"), overwrite=True)
  config = hf_tokenizer.read_tokenizer_config(tok.path)
  if tok.template_name:
    source = CHATML_TEMPLATE if tok.template_name == "chatml" else LLAMA3_TEMPLATE
    system = tok.system_prompt or ""
    # The hand-written templates' default system prompt, written into the template.
    source = "{% set system_prompt = " + json.dumps(system) + " %}" + source
    name = tok.template_name
  else:
    source = jinja_template.find_chat_template(tok.path, config)
    if tok.system_prompt:  # As the run trained: a system turn first unless one is given.
      source = ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = "
                "[{'role': 'system', 'content': " + json.dumps(tok.system_prompt) + "}] + "
                "messages %}{%- endif %}" + source)
    name = "own"
  config.update(chat_template=source, image_token=tok.image_token, padding_side="left")
  config.setdefault("extra_special_tokens", {})
  if isinstance(config["extra_special_tokens"], dict):
    config["extra_special_tokens"]["image_token"] = tok.image_token
  config.setdefault("pad_token", tok.id_to_token(tok.pad_id))
  if tok.bos_id is not None and not config.get("bos_token"):
    config["bos_token"] = tok.id_to_token(tok.bos_id)  # the hand-written llama3's default
  config.pop("auto_map", None)  # the source's remote tokenizer code is not shipped
  paths.write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
  return TokenizerFiles(tok.image_token, source, name)
