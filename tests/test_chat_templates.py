"""A tokenizer's own Jinja chat template against transformers' apply_chat_template.

For Qwen2.5, Llama 3, Gemma 2 and Mistral (v0.3) style templates, each written into a
tokenizer_config.json built here beside a byte-level BPE tokenizer.json: the ids equal
``apply_chat_template``'s, and the loss mask equals its ``assistant_masks`` on the same
template with ``{% generation %}`` tags around each reply and its end of turn, single-
and multi-turn, with and without a system turn, and with a generation prompt.
"""

import json
import os

import pytest
import transformers

from tests.test_chat_tokenizers import _bpe
from tokenflex_jax.data import chat, conversation
from tokenflex_jax.data.conversation import ConversationError
from tokenflex_jax.errors import ConfigError

IMAGE_TOKEN = "<|image_pad|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
            "<unk>"]

# Each family's template as shipped (its message part; tools are not used here), with
# <G> and </G> where transformers' {% generation %} tags go around a reply and its end of
# turn: removed for the template as shipped, turned into tags for the masked variant.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"user\" or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}<G>{{- message.content + '<|im_end|>' }}</G>"
    "{{- '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}<G>{{ message['content'] | trim + '<|eot_id|>' }}</G>"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}<G>"
    "{{ message['content'] | trim + '<end_of_turn>' }}</G>{% else %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' }}<G>{{- message['content'] | trim + eos_token }}</G>\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n")
FAMILIES = {  # template, bos, eos, pad
    "qwen2.5": (QWEN25, None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None),
    "gemma2": (GEMMA2, "<bos>", "<eos>", "<pad>"),
    "mistral": (MISTRAL, "<s>", "</s>", None),
}
CONVERSATIONS = {
    "single": [("user", "<image>\nWhat is in the picture?"), ("assistant", "A red square.")],
    "multi": [("user", "Describe it. <image>"), ("assistant", "  A red square. "),
              ("user", "And the border?"), ("assistant", "Thin, and blue.")],
    "system": [("system", "You are terse."), ("user", "<image>\nWhat colour?"),
               ("assistant", "Red."), ("user", "Sure?"), ("assistant", "Yes.")],
    "prompt": [("user", "<image>\nWhat colour is it?")],
    "system_prompt": [("system", "Answer in one word."), ("user", "<image>Colour?")],
    "text_only": [("user", "Hello there!"), ("assistant", "Hi! How can I help?")],
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """One byte-level BPE tokenizer.json (test_chat_tokenizers' Qwen2-style BPE) with every
  family's special tokens."""
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  _bpe(SPECIALS).save(str(path))
  return path


def _write(folder, tokenizer_json, family, tagged):
  template, bos, eos, pad = FAMILIES[family]
  template = (template.replace("<G>", "{% generation %}").replace("</G>", "{% endgeneration %}")
              if tagged else template.replace("<G>", "").replace("</G>", ""))
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
    f.write(tokenizer_json.read_text(encoding="utf-8"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
            "eos_token": eos, **({"bos_token": bos} if bos else {}),
            **({"pad_token": pad} if pad else {})}
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return folder


def _messages(turns):
  """The turns as transformers' messages: the <image> marker (and one newline after it)
  becomes the image token, the project's rule for every template."""
  out = []
  for t in conversation.parse_conversation(turns):
    content = t.joined(IMAGE_TOKEN)
    out.append({"role": t.role, "content": content})
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ids_and_masks_equal_apply_chat_template(tmp_path, tokenizer_json, family):
  shipped = _write(str(tmp_path / "shipped"), tokenizer_json, family, tagged=False)
  tagged = _write(str(tmp_path / "tagged"), tokenizer_json, family, tagged=True)
  ours = chat.load_tokenizer(kind="hf", path=shipped, image_token=IMAGE_TOKEN)
  ours_tagged = chat.load_tokenizer(kind="hf", path=tagged, image_token=IMAGE_TOKEN)
  reference = transformers.AutoTokenizer.from_pretrained(tagged)
  checked = 0
  for name, turns in CONVERSATIONS.items():
    generation_prompt = turns[-1][0] == "user"
    if family == "gemma2" and turns[0][0] == "system":  # Gemma 2 has no system role.
      with pytest.raises(ConversationError, match="System role not supported"):
        ours.conversation_ids(turns)
      with pytest.raises(Exception, match="System role not supported"):
        reference.apply_chat_template(_messages(turns), tokenize=False)
      continue
    expected = reference.apply_chat_template(
        _messages(turns), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        add_generation_prompt=generation_prompt)
    ids, mask = ours.conversation_ids(turns)
    assert ids == list(expected["input_ids"]), (family, name)
    assert mask == [bool(m) for m in expected["assistant_masks"]], (family, name)
    assert ours_tagged.conversation_ids(turns) == (ids, mask), (family, name)
    assert ids.count(ours.image_id) == (0 if name == "text_only" else 1)
    if not generation_prompt:  # the mask ends on the end of turn, which stops decoding
      last = max(i for i, m in enumerate(mask) if m)
      assert ids[last] == ours.eos_id
    checked += 1
  assert checked >= 4
  assert ours.prompt_ids("Colour?") == ours.conversation_ids([("user", "<image>\nColour?")])[0]


def test_a_tokenizer_without_a_template_needs_one_named(tmp_path, tokenizer_json):
  folder = tmp_path / "plain"
  folder.mkdir()
  (folder / "tokenizer.json").write_text(tokenizer_json.read_text(encoding="utf-8"))
  with pytest.raises(ConfigError, match="no chat_template.*chatml"):
    chat.load_tokenizer(kind="hf", path=str(folder), image_token=IMAGE_TOKEN)
  # A chat_template.jinja file beside it (transformers' newer layout) is read too.
  (folder / "chat_template.jinja").write_text(QWEN25.replace("<G>", "").replace("</G>", ""))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  tok = chat.load_tokenizer(kind="hf", path=str(folder), image_token=IMAGE_TOKEN)
  assert tok.eos_id == tok.conversation_ids([("user", "a"), ("assistant", "b")])[0][-2]
