"""Chat tokenizers behind one interface (`chat.ChatTokenizer`).

A Hugging Face tokenizer.json (chatml, llama3) must give exactly the ids and assistant
masks of transformers' ``apply_chat_template``; sentencepiece models (llama2, gemma) the
hand-built ids of their templates (gemma also transformers'); the project's tokenizer
``prompt_ids + answer_ids``. Everything is built here, offline (HF_HUB_OFFLINE=1).
"""

import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # pylint: disable=wrong-import-position
import sentencepiece as spm  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position
from tokenizers import (  # pylint: disable=wrong-import-position
    Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers)

from tokenflex_jax.data import chat, conversation  # pylint: disable=wrong-import-position
from tokenflex_jax.data import tokenizer as tok_lib  # pylint: disable=wrong-import-position
from tokenflex_jax.data.hf_tokenizer import (  # pylint: disable=wrong-import-position
    QWEN25_SYSTEM_PROMPT, HFTokenizer)
from tokenflex_jax.data.sp_chat_tokenizer import (  # pylint: disable=wrong-import-position
    SentencePieceChatTokenizer)

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"]
IMAGE_TOKENS = ["<|image_pad|>", "<image>"]
# Qwen2's pre-tokenizer pattern (digits one by one; Llama 3 takes up to three).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["What colour is the circle? The circle is red.", "And the square? It is blue.",
         "What is in the picture? A red circle and a blue square.", "system user assistant",
         QWEN25_SYSTEM_PROMPT, "Hello there! How can I help?", "Quelle couleur? Rouge.",
         "First line\n\nSecond line\n\nThird line"]

# In the spirit of Qwen2.5's and Llama 3's templates (no tools); {% generation %} marks
# the assistant's tokens for transformers' return_assistant_tokens_mask.
QWEN_TEMPLATE = r"""
{%- if messages[0]['role'] == 'system' %}
  {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
  {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. '
      + 'You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message['role'] == 'assistant' %}
    {{- '<|im_start|>assistant\n' }}
    {%- generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}
    {{- '\n' }}
  {%- elif not (message['role'] == 'system' and loop.first) %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
LLAMA3_TEMPLATE = r"""
{%- for message in messages %}
  {%- set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}
  {%- if loop.first %}{%- set header = bos_token + header %}{%- endif %}
  {%- if message['role'] == 'assistant' %}
    {{- header }}
    {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
  {%- else %}
    {{- header + message['content'] | trim + '<|eot_id|>' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
GEMMA_TEMPLATE = r"""
{{- bos_token }}
{%- for message in messages %}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
  {{- '<start_of_turn>' + role + '\n' }}
  {%- if message['role'] == 'assistant' %}
    {% generation %}{{- message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{- '\n' }}
  {%- else %}
    {{- message['content'] | trim + '<end_of_turn>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""

CONVERSATIONS = {
    "single": [("user", "<image>\nWhat colour is the circle?"),
               ("assistant", "The circle is red.")],
    "prompt": [("user", "<image>\nWhat colour is the circle?")],
    "image_after": [("user", "What colour is the circle?<image>"), ("assistant", "Red.")],
    "llava_multi": [("human", "What is in the picture?\n<image>"),
                    ("gpt", "A red circle and a blue square."),
                    ("human", "And the square?"), ("gpt", "It is blue.")],
    "multi_prompt": [("user", "<image>\nWhat is in the picture?"), ("assistant", "A circle."),
                     ("user", "What colour is it?")],
    "whitespace": [("user", "  <image>\n\n What colour?  "), ("assistant", "  It is red.\n\n")],
    "text_only": [("user", "Hello there!"), ("assistant", "Hi! How can I help?")],
    # chatml: "\n\n" is one token across the header's end and the reply's start.
    "reply_newline": [("user", "<image>\nHello there!"), ("assistant", "\nIt is red.")],
    "unicode": [("user", "<image>\nQuelle couleur? 🙂"), ("assistant", "Rouge — écarlate.")],
}


def _bpe(specials: list[str]) -> Tokenizer:
  """A tiny byte-level BPE in Qwen2's manner (NFC, split pattern, byte level)."""
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 2, trainer)
  return tok


def _write(directory, tok: Tokenizer, config: dict) -> str:
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
  return str(directory)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{"chatml": dir, "llama3": dir}: one tiny BPE with both templates' special tokens,
  saved with Qwen2.5's and Llama 3's configs (Llama 3's post-processor adds bos)."""
  root = tmp_path_factory.mktemp("hf")
  tok = _bpe(CHATML_TOKENS + LLAMA3_TOKENS + IMAGE_TOKENS)
  chatml = _write(root / "qwen", tok, {"chat_template": QWEN_TEMPLATE, "bos_token": None,
                                       "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                    special_tokens=[("<|begin_of_text|>", bos)])])
  llama3 = _write(root / "llama3", tok, {"chat_template": LLAMA3_TEMPLATE,
                                         "bos_token": "<|begin_of_text|>",
                                         "eos_token": "<|eot_id|>"})
  return {"chatml": chatml, "llama3": llama3}


def _hf_messages(turns, image_token: str) -> list[dict]:
  """Our turns as transformers messages: the marker (and one newline) -> image token."""
  messages = []
  for role, text in turns:
    before, marker, after = text.partition(chat.IMAGE_MARKER)
    if marker:
      text = before + image_token + after.removeprefix("\n")
    messages.append({"role": conversation.ROLES[role], "content": text})
  return messages


def _reference(hf, turns, image_token: str, system: str | None = None):
  """transformers' (ids, assistant mask) for ``turns``; a generation prompt after a user
  turn."""
  messages = _hf_messages(turns, image_token)
  if system is not None:
    messages = [{"role": "system", "content": system}] + messages
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                               add_generation_prompt=messages[-1]["role"] == "user",
                               return_assistant_tokens_mask=True)
  return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("template,image_token", [("chatml", "<|image_pad|>"),
                                                  ("llama3", "<image>")])
@pytest.mark.parametrize("own", [False, True], ids=["hand-written", "file's jinja"])
def test_hf_matches_apply_chat_template(hf_dirs, template, image_token, own):
  """The hand-written template, and the file's own rendered by jinja_template."""
  ours = HFTokenizer(hf_dirs[template], "" if own else template, image_token)
  hf = transformers.AutoTokenizer.from_pretrained(hf_dirs[template])
  system_turn = [("system", "You are terse.")] + CONVERSATIONS["llava_multi"]
  for name, turns in {**CONVERSATIONS, "system_turn": system_turn}.items():
    ids, mask = ours.conversation_ids(turns)
    ref_ids, ref_mask = _reference(hf, turns, image_token)
    assert ids == ref_ids, name
    assert mask == ref_mask, name
    assert ids.count(ours.image_id) == (chat.IMAGE_MARKER in "".join(t for _, t in turns))
  system = "  Answer in one word.  "
  with_system = HFTokenizer(hf_dirs[template], "" if own else template, image_token,
                            system_prompt=system)
  turns = CONVERSATIONS["llava_multi"]
  assert with_system.conversation_ids(turns) == _reference(hf, turns, image_token, system)
  q = "What colour is the circle?"
  for image_first in (True, False):
    user = conversation.question_with_image(q, image_first)
    assert ours.prompt_ids(q, image_first) == _reference(hf, [("user", user)], image_token)[0]


def test_hf_prompt_answer_and_mask_agree(hf_dirs):
  q, a = "What colour is the circle?", "The circle is red."
  for template, separator in (("chatml", "\n"), ("llama3", "")):
    tok = HFTokenizer(hf_dirs[template], template, "<|image_pad|>")
    prompt, answer = tok.prompt_ids(q), tok.answer_ids(a)
    ids, mask = tok.conversation_ids([("user", f"<image>\n{q}"), ("assistant", a)])
    tail = tok.encode(separator)
    assert ids == prompt + answer + tail
    assert mask == [False] * len(prompt) + [True] * len(answer) + [False] * len(tail)
    assert answer[-1] == tok.eos_id and prompt.count(tok.image_id) == 1
  bare = HFTokenizer(hf_dirs["chatml"], "chatml", "<|image_pad|>", system_prompt="")
  head, tail = bare.encode("<|im_start|>user\n"), bare.encode("<|im_start|>assistant\n")
  ids = bare.conversation_ids([("user", q)])[0]  # no system turn, no image
  assert ids == head + bare.encode(q + "<|im_end|>\n") + tail


def test_hf_special_ids_decode_and_pickle(hf_dirs):
  chatml = HFTokenizer(os.path.join(hf_dirs["chatml"], "tokenizer.json"), "chatml",
                       "<|image_pad|>")
  ids = {t: chatml.encode(t)[0] for t in CHATML_TOKENS + IMAGE_TOKENS}
  assert (chatml.pad_id, chatml.eos_id, chatml.image_id) == (
      ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|image_pad|>"])
  llama3 = HFTokenizer(hf_dirs["llama3"], "llama3", "<image>")
  assert (llama3.pad_id, llama3.eos_id, llama3.bos_id) == tuple(
      llama3.encode(t)[0] for t in ("<|end_of_text|>", "<|eot_id|>", "<|begin_of_text|>"))
  assert llama3.conversation_ids(CONVERSATIONS["prompt"])[0][0] == llama3.bos_id
  assert chatml.vocab_size == llama3.vocab_size > max(ids.values())
  for tok in (chatml, llama3):
    for text in TEXTS + ["Rouge — écarlate 🙂", "  spaced\n\nlines  "]:
      assert tok.decode(tok.encode(text)) == text
    a = "The circle is red."
    assert tok.decode(tok.answer_ids(a) + tok.encode("It is blue.")) == a  # stops at eot
    assert tok.decode([tok.pad_id, tok.image_id, *tok.encode(a), tok.pad_id]) == a
    clone = pickle.loads(pickle.dumps(tok))
    for turns in CONVERSATIONS.values():
      assert clone.conversation_ids(turns) == tok.conversation_ids(turns)
    assert isinstance(tok, chat.ChatTokenizer)


def test_hf_errors_name_the_problem(hf_dirs, tmp_path):
  with pytest.raises(ValueError, match=r"tokenizer\.json has no token '<\|vision_pad\|>'"):
    HFTokenizer(hf_dirs["chatml"], "chatml", "<|vision_pad|>")
  with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
    HFTokenizer(hf_dirs["chatml"], "vicuna", "<|image_pad|>")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    HFTokenizer(str(tmp_path / "nowhere"), "chatml", "<|image_pad|>")
  qwen_only = _write(tmp_path / "qwen_only", _bpe(CHATML_TOKENS + ["<|image_pad|>"]), {})
  with pytest.raises(ValueError, match=r"no added token '<\|start_header_id\|>'.*'llama3'"):
    HFTokenizer(qwen_only, "llama3", "<|image_pad|>")
  tok = HFTokenizer(qwen_only, "chatml", "<|image_pad|>")
  with pytest.raises(ValueError, match="image token itself"):
    tok.conversation_ids([("user", "<image>\nWhat is <|image_pad|>?")])
  with pytest.raises(ValueError, match="image token itself"):
    tok.prompt_ids("What is <|image_pad|>?")


@pytest.mark.parametrize("turns,message", [
    ([("user", "<image>\n<image 2>\nTwo?")], "one kind per conversation"),
    ([("user", "Hi"), ("assistant", "Look: <image>")], "in an assistant turn"),
    ([("user", "Hi"), ("system", "Be brief.")], "can only be the first"),
    ([("system", "Look: <image>"), ("user", "Hi")], "in a system turn"),
    ([("user", "Hi"), ("bot", "Hello")], "unknown role 'bot'"),
    ([("assistant", "Hello"), ("user", "Hi")], "must alternate"),
    ([("user", "Hi"), ("user", "Hi again")], "must alternate"),
    ([], "at least one user turn"),
    ([("system", "Be brief.")], "at least one user turn"),
])
def test_bad_conversations_raise(hf_dirs, sp_models, project_tok, turns, message):
  tokenizers = [HFTokenizer(hf_dirs["chatml"], "chatml", "<|image_pad|>"), project_tok,
                SentencePieceChatTokenizer(sp_models["gemma"], "gemma", "<image>")]
  for tok in tokenizers:
    with pytest.raises(ValueError, match=message):
      tok.conversation_ids(turns)


def test_several_images_take_one_placeholder_each(hf_dirs, sp_models, project_tok):
  """Two images in one turn, a third in a later turn, as `<image>` or `<image k>`: one
  placeholder each where its marker was, and the text between them kept."""
  tokenizers = [HFTokenizer(hf_dirs["chatml"], "chatml", "<|image_pad|>"), project_tok,
                SentencePieceChatTokenizer(sp_models["gemma"], "gemma", "<image>")]
  for markers in (("<image>", "<image>", "<image>"), ("<image 1>", "<image 2>", "<image 3>")):
    turns = [("user", f"{markers[0]}\nand {markers[1]}\nDiffer?"), ("assistant", "Yes."),
             ("user", f"Now {markers[2]}?"), ("assistant", "Red.")]
    for tok in tokenizers:
      ids, mask = tok.conversation_ids(turns)
      where = [i for i, t in enumerate(ids) if t == tok.image_id]
      assert len(where) == 3 and not any(mask[i] for i in where)
      between = tok.decode(ids[where[0] + 1:where[1]])
      assert "and" in between and "Differ" not in between
  parsed = conversation.parse_conversation(
      [("user", "<image 2> then <image 1> and <image 2>"), ("assistant", "ok")])
  assert conversation.image_order(parsed, 2) == (1, 0, 1)
  with pytest.raises(ValueError, match="names image 3 of 2"):
    conversation.image_order(conversation.parse_conversation(
        [("user", "<image 3>"), ("assistant", "ok")]), 2)
  with pytest.raises(ValueError, match="2 '<image>' markers for 1 image"):
    conversation.image_order(conversation.parse_conversation(
        [("user", "<image><image>"), ("assistant", "ok")]), 1)


def _train_sp(path: str, user_defined: list[str], **options) -> str:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS * 3), model_prefix=path[:-len(".model")], vocab_size=400,
      model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
      user_defined_symbols=user_defined, num_threads=1, minloglevel=2, **options)
  return path


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
  """{"llama2": path, "gemma": path}: tiny models with Llama 2's ids (unk 0, bos 1,
  eos 2, no pad) and Gemma's (pad 0, eos 1, bos 2, unk 3, no dummy prefix, bytes)."""
  root = tmp_path_factory.mktemp("sp")
  llama2 = _train_sp(str(root / "llama2.model"), ["[INST]", "[/INST]", "<image>"],
                     unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  os.makedirs(root / "gemma")
  gemma = _train_sp(str(root / "gemma" / "tokenizer.model"),
                    ["<start_of_turn>", "<end_of_turn>", "<image>", "\n"],
                    pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                    eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                    add_dummy_prefix=False, remove_extra_whitespaces=False,
                    normalization_rule_name="identity", byte_fallback=True)
  return {"llama2": llama2, "gemma": gemma}


def _flatten(chunks) -> tuple[list[int], list[bool]]:
  ids = [i for chunk, _ in chunks for i in chunk]
  return ids, [loss for chunk, loss in chunks for _ in chunk]


def test_llama2_template(sp_models):
  tok = SentencePieceChatTokenizer(sp_models["llama2"], "llama2", "<image>")
  sp = spm.SentencePieceProcessor(model_file=sp_models["llama2"])
  enc, img = sp.encode, sp.piece_to_id("<image>")
  turns = [("human", "<image>\nWhat colour is the circle?"), ("gpt", " The circle is red. "),
           ("human", "And the square?"), ("gpt", "It is blue.")]
  expected = _flatten([
      ([1, *enc("[INST]"), img, *enc("What colour is the circle?"), *enc("[/INST]")], False),
      ([*enc("The circle is red."), 2], True),
      ([1, *enc("[INST]"), *enc("And the square?"), *enc("[/INST]")], False),
      ([*enc("It is blue."), 2], True)])
  assert tok.conversation_ids(turns) == expected
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, img)  # pad: unk
  q, a = "And the square?", "It is blue."
  prompt, answer = tok.prompt_ids(q, image_first=False), tok.answer_ids(a)
  assert prompt == [1, *enc("[INST]"), *enc(q), img, *enc("[/INST]")]
  ids, mask = tok.conversation_ids([("user", f"{q}<image>"), ("assistant", a)])
  assert (ids, mask) == (prompt + answer, [False] * len(prompt) + [True] * len(answer))
  assert tok.decode(answer + enc("red")) == a
  assert tok.decode([0, *enc("The circle is red.")]) == "The circle is red."


def test_gemma_template_matches_transformers(sp_models):
  tok = SentencePieceChatTokenizer(sp_models["gemma"], "gemma", "<image>")
  sp = spm.SentencePieceProcessor(model_file=sp_models["gemma"])
  enc, piece = sp.encode, sp.piece_to_id
  start, end, img = piece("<start_of_turn>"), piece("<end_of_turn>"), piece("<image>")
  turns = CONVERSATIONS["llava_multi"]
  expected = _flatten([
      ([2, start, *enc("user\n"), *enc("What is in the picture?\n"), img, end, *enc("\n")],
       False),
      ([start, *enc("model\n")], False),
      ([*enc("A red circle and a blue square."), end], True), (enc("\n"), False),
      ([start, *enc("user\n"), *enc("And the square?"), end, *enc("\n")], False),
      ([start, *enc("model\n")], False), ([*enc("It is blue."), end], True),
      (enc("\n"), False)])
  assert tok.conversation_ids(turns) == expected
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, end)
  with open(os.path.join(os.path.dirname(sp_models["gemma"]), "tokenizer_config.json"), "w",
            encoding="utf-8") as f:
    json.dump({"tokenizer_class": "GemmaTokenizer", "chat_template": GEMMA_TEMPLATE}, f)
  hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(sp_models["gemma"]))
  for name, turns in CONVERSATIONS.items():
    assert tok.conversation_ids(turns) == _reference(hf, turns, "<image>"), name
  assert tok.decode(tok.answer_ids(" Red. ") + enc("Blue")) == "Red."
  assert tok.decode(tok.encode("Rouge — écarlate 🙂")) == "Rouge — écarlate 🙂"


def test_sentencepiece_errors_and_pickle(sp_models, tmp_path):
  with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
    SentencePieceChatTokenizer(sp_models["llama2"], "chatml", "<image>")
  with pytest.raises(ValueError, match=r"llama2\.model has no piece '<img>'"):
    SentencePieceChatTokenizer(sp_models["llama2"], "llama2", "<img>")
  with pytest.raises(ValueError, match="has no piece '<start_of_turn>'"):
    SentencePieceChatTokenizer(sp_models["llama2"], "gemma", "<image>")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    SentencePieceChatTokenizer(str(tmp_path / "nope.model"), "llama2", "<image>")
  for template in ("llama2", "gemma"):
    tok = SentencePieceChatTokenizer(sp_models[template], template, "<image>")
    clone = pickle.loads(pickle.dumps(tok))
    turns = CONVERSATIONS["multi_prompt"]
    assert clone.conversation_ids(turns) == tok.conversation_ids(turns)
    assert isinstance(tok, chat.ChatTokenizer)


@pytest.fixture(scope="module")
def project_tok(tmp_path_factory):
  return tok_lib.ensure_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def test_project_conversation_ids(project_tok):
  tok = project_tok
  q, a = "What colour is the shape in the top left?", "magenta"
  for image_first in (True, False):
    prompt, answer = tok.prompt_ids(q, image_first), tok.answer_ids(a)
    user = conversation.question_with_image(q, image_first)
    assert tok.conversation_ids([("user", user)]) == (prompt, [False] * len(prompt))
    ids, mask = tok.conversation_ids([("human", user), ("gpt", a)])
    assert (ids, mask) == (prompt + answer, [False] * len(prompt) + [True] * len(answer))
  ids, mask = tok.conversation_ids([("user", f"<image>\n{q}"), ("assistant", a),
                                    ("user", "What shape is it?"), ("assistant", "circle")])
  second = [tok.user_id, *tok.encode("What shape is it?"), tok.assistant_id]
  assert ids == tok.prompt_ids(q) + tok.answer_ids(a) + second + tok.answer_ids("circle")
  assert [i for i, m in zip(ids, mask) if m] == tok.answer_ids(a) + tok.answer_ids("circle")
  assert isinstance(tok, chat.ChatTokenizer)


def test_load_tokenizer(hf_dirs, sp_models, project_tok):
  assert isinstance(chat.load_tokenizer("project", project_tok.model_path, "", ""),
                    tok_lib.Tokenizer)
  assert isinstance(chat.load_tokenizer("project", project_tok.model_path, "project",
                                        "<image>"), tok_lib.Tokenizer)
  gemma = chat.load_tokenizer("sentencepiece", sp_models["gemma"], "gemma", "<image>")
  assert isinstance(gemma, SentencePieceChatTokenizer)
  hf = chat.load_tokenizer("hf", hf_dirs["chatml"], "chatml", "<|image_pad|>",
                           system_prompt="Be brief.")
  assert isinstance(hf, HFTokenizer)
  assert hf.decode(hf.prompt_ids("Hi")) == "system\nBe brief."  # stops at <|im_end|>
  with pytest.raises(ValueError, match="unknown config.tokenizer.kind 'tiktoken'"):
    chat.load_tokenizer("tiktoken", hf_dirs["chatml"], "chatml", "<|image_pad|>")
  with pytest.raises(ValueError, match="config.tokenizer.template='chatml'"):
    chat.load_tokenizer("project", project_tok.model_path, "chatml", "")
  with pytest.raises(ValueError, match="needs config.tokenizer.image_token"):
    chat.load_tokenizer("hf", hf_dirs["chatml"], "chatml", "")
  with pytest.raises(ValueError, match="unknown chat template 'gemma'"):
    chat.load_tokenizer("hf", hf_dirs["chatml"], "gemma", "<|image_pad|>")


def test_templates_without_a_system_role_refuse_a_system_turn(sp_models, project_tok):
  turns = [("system", "Be brief."), ("user", "<image>\nHi")]
  for tok in (project_tok, SentencePieceChatTokenizer(sp_models["gemma"], "gemma", "<image>")):
    with pytest.raises(ValueError, match="takes no system turn"):
      tok.conversation_ids(turns)
