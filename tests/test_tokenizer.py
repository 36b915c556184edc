"""The sentencepiece tokenizer: deterministic training, round trips, chat template."""

import os
import pickle

import pytest

from tokenflex_jax.data import scenes
from tokenflex_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.ensure_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def test_training_is_deterministic(tmp_path):
  a, b = str(tmp_path / "a.model"), str(tmp_path / "sub" / "b.model")
  tok_lib.train_tokenizer(a, scenes.corpus_texts())
  tok_lib.train_tokenizer(b, scenes.corpus_texts())
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  assert sorted(os.listdir(tmp_path)) == ["a.model", "sub"]  # no temp files left behind


def test_round_trip_of_every_corpus_text(tok):
  for text in scenes.corpus_texts():
    ids = tok.encode(text)
    assert ids and 1 not in ids  # 1: unk
    assert tok.decode(ids) == text


def test_special_ids(tok):
  ids = [tok.pad_id, 1, tok.bos_id, tok.eos_id, tok.image_id, tok.user_id, tok.assistant_id]
  assert len(set(ids)) == len(ids)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert max(ids) < tok.vocab_size <= 256
  for token, i in ((tok_lib.IMAGE_TOKEN, tok.image_id), (tok_lib.USER_TOKEN, tok.user_id),
                   (tok_lib.ASSISTANT_TOKEN, tok.assistant_id)):
    assert i in tok.encode(token)


def test_chat_template(tok):
  q, a = "What colour is the shape in the top left?", "magenta"
  prompt = tok.prompt_ids(q)
  assert prompt[:3] == [tok.bos_id, tok.user_id, tok.image_id]
  assert prompt[3:-1] == tok.encode(q) and prompt[-1] == tok.assistant_id
  assert prompt.count(tok.image_id) == 1
  after = tok.prompt_ids(q, image_first=False)
  assert after == [tok.bos_id, tok.user_id, *tok.encode(q), tok.image_id, tok.assistant_id]
  answer = tok.answer_ids(a)
  assert answer == tok.encode(a) + [tok.eos_id]
  assert tok.decode(prompt + answer) == q + " " + a
  assert tok.decode(answer + tok.encode("red")) == a  # stops at eos
  assert tok.decode([tok.pad_id] + answer[:-1] + [tok.pad_id] * 3) == a


def test_every_example_fits_the_demo_text_length(tok):
  # configs/demo.py pads prompt + answer to max_text_length = 24.
  questions = [t for f in scenes.FAMILIES for t in f.questions]
  answers = [t for f in scenes.FAMILIES for t in f.answers]
  longest = max(len(tok.prompt_ids(q)) for q in questions) + max(
      len(tok.answer_ids(a)) for a in answers)
  assert longest <= 24


def test_missing_model_and_pickling(tok, tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok_lib.Tokenizer(missing)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.prompt_ids("What shape is it?") == tok.prompt_ids("What shape is it?")


def test_ensure_tokenizer_keeps_an_existing_file(tok):
  path = tok.model_path
  mtime = os.stat(path).st_mtime_ns
  again = tok_lib.ensure_tokenizer(path)
  assert os.stat(path).st_mtime_ns == mtime
  assert again.vocab_size == tok.vocab_size
