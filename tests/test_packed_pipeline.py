"""Packed rows from real data: a LLaVA build of synthetic mix665k-shaped conversations
(several images, text-only rows) planned, assembled, batched, resumed and trained on;
a packed weighted mixture with the procedural suite; bad records under "skip"."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_real_formats import make_hf_tokenizer
from tests.tiny import TINY_FLAGS, losses, tiny_config
from tests.xla_env import REPO, binary_env
from tokenflex_jax.data import chat, llava_tfds, pack, pipeline, synthetic_llava
from tokenflex_jax.data.rows import MalformedRowError
from tokenflex_jax.errors import InputError
from tokenflex_jax.eval import run_eval
from tokenflex_jax.train import train

IMAGE_TOKEN = "<|image_pad|>"
T, K = 128, 4  # token slots and image slots per row
SIZE = 32  # the procedural scenes are drawn at 32 px or more


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  """(the build's folder, the tokenizer's path): 60 synthetic conversations, a fifth of
  the image rows with 2-3 images, at a twentieth of mix665k's lengths."""
  root = tmp_path_factory.mktemp("packed")
  json_path = synthetic_llava.write_llava(str(root / "rows"), 60, seed=3, scale=0.05,
                                          multi_image_share=0.2, max_images=3)
  folder = llava_tfds.build(str(root / "tfds"), json_path, str(root / "rows" / "images"))
  words = (" ".join(synthetic_llava.WORDS),) * 5
  return folder, make_hf_tokenizer(str(root / "tokenizer"), words)


def _tokenizer(build):
  return chat.load_tokenizer(kind="hf", path=build[1], template="chatml",
                             image_token=IMAGE_TOKEN, system_prompt="")


def _config(build, **overrides):
  return tiny_config(**{
      "data__source": "llava", "data__tfds_dir": build[0], "data__max_text_length": T,
      "data__image_slots": K, "data__pack": True, "data__image_size": SIZE,
      "data__truncate": True, "model__vit__image_size": SIZE, "tokenizer__kind": "hf",
      "tokenizer__path": build[1], "tokenizer__template": "chatml",
      "tokenizer__image_token": IMAGE_TOKEN, "tokenizer__system_prompt": "",
      "token_counts": (16, 64),
      "token_probs": (0.5, 0.5), "eval__token_counts": (16,), **overrides})


def _packed(build, **overrides):
  from tokenflex_jax.app import config_schema  # pylint: disable=import-outside-toplevel
  spec = config_schema.to_spec(_config(build, **overrides))
  source, transform = pipeline.training_source(spec.data, lambda: _tokenizer(build))
  return source, transform, spec


def test_every_conversation_lands_in_one_row_whole_and_in_order(build):
  source, _, spec = _packed(build)
  tok = _tokenizer(build)
  stream = grain_stream(build, spec)
  members = [i for r in range(len(source)) for i in source.members(r)]
  assert sorted(members) == list(range(60)), "each conversation in exactly one row"
  assert len(source) < 60 / 2, f"{len(source)} rows: packing should put 2+ per row"
  preprocess = pipeline.make_transform(spec.data, lambda: tok)
  multi = text_only = 0
  for r in range(len(source)):
    row = source[r]
    assert row["image"].shape == (K, SIZE, SIZE, 3) and row["tokens"].shape == (T,)
    at = slot = 0
    for segment, i in enumerate(source.members(r), start=1):
      piece = preprocess.piece(stream[i])
      n, m = len(piece.tokens), len(piece.images)
      np.testing.assert_array_equal(row["tokens"][at:at + n], piece.tokens)
      np.testing.assert_array_equal(row["loss_mask"][at:at + n], piece.loss_mask)
      assert (row["segments"][at:at + n] == segment).all()
      np.testing.assert_array_equal(row["image"][slot:slot + m], piece.images)
      at, slot = at + n, slot + m
      multi, text_only = multi + (m > 1), text_only + (m == 0)
    assert (row["segments"][at:] == 0).all() and (row["tokens"][at:] == tok.pad_id).all()
    assert not row["image"][slot:].any()  # unused image slots stay empty
  assert multi and text_only, (multi, text_only)


def grain_stream(build, spec):
  """The stream `training_source` packs: the build, shuffled with data.seed + 1."""
  return pipeline.grain.MapDataset.source(
      llava_tfds.LlavaTfdsSource(build[0])).seed(spec.data.seed + 1).shuffle()


def test_the_plan_is_deterministic_and_batches_resume(build):
  a, transform, spec = _packed(build)
  b, _, _ = _packed(build)
  assert [a.members(r) for r in range(len(a))] == [b.members(r) for r in range(len(b))]
  it = pipeline.make_iterator(a, transform, 4, seed=0)
  batches = [next(it) for _ in range(5)]  # past one pass over the rows: repeated
  assert set(batches[0]) == {"image", "tokens", "loss_mask", "segments"}
  resumed = pipeline.make_iterator(b, transform, 4, seed=0, start_batch=3)
  for want in batches[3:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_planned_rows_are_as_full_as_the_planner_says(build):
  source, _, spec = _packed(build)
  lengths = [pack.Lengths(int(t), int(i)) for t, i in source.lengths]
  figures = pack.figures(lengths, pipeline.row_shape(spec.data), (16,), packed=True)
  assert figures.rows == len(source)
  useful = sum(float((source[r]["segments"] > 0).sum()) for r in range(len(source)))
  assert useful == sum(c.text_tokens + c.images for c in lengths)


def test_the_planner_measures_a_built_dataset_as_packing_does(build, tmp_path):
  """`python -m tokenflex_jax.data.packing` without --lengths: the config's build,
  measured uncut, planned into the figures; the binary prints them."""
  from tokenflex_jax.app import config_schema  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.data import packing  # pylint: disable=import-outside-toplevel
  spec = config_schema.to_spec(_config(build))
  lengths = packing.measured(spec)
  assert len(lengths) == 60 and sum(c.images for c in lengths) > 60  # several per row
  source, _, _ = _packed(build)
  cut = [pack.Lengths(int(t), int(i)) for t, i in source.lengths]
  # Uncut: what training (C = T - K) would truncate is seen whole here.
  assert all(a.text_tokens >= b.text_tokens and a.images == b.images
             for a, b in zip(lengths, cut))
  assert any(a.text_tokens > T - K for a in lengths)
  out = tmp_path / "plan.json"
  flags = [f"--config.data.tfds_dir={build[0]}", f"--config.tokenizer.path={build[1]}",
           "--config.tokenizer.kind=hf", "--config.tokenizer.template=chatml",
           f"--config.tokenizer.image_token={IMAGE_TOKEN}", "--config.tokenizer.system_prompt=",
           "--config.data.source=llava", f"--config.data.max_text_length={T}",
           "--config.token_counts=(16,64)",
           "--config.token_probs=(0.5,0.5)", "--text_capacity=124", "--images_per_row=4"]
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.data.packing",
                           "--config=configs/demo.py", f"--json_out={out}", *flags],
                          cwd=REPO, env={k: v for k, v in os.environ.items()
                                         if k != "XLA_FLAGS"},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert plan["conversations"] == 60 and plan["packed_shape"]["image_slots"] == 4
  want = packing.plan(lengths, spec.token_counts, spec.data.max_text_length, 124, 4)
  assert plan["buckets"]["16"] == pytest.approx(want["buckets"][16])
  assert "packed / padded" in result.stdout


def test_a_packed_multi_image_run_resumes_bit_identically_and_evaluates(build, tmp_path):
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  one = dict(token_counts=(16,), token_probs=(1.0,), checkpoint_every=2)
  train(_config(build, total_steps=4, **one), whole)
  train(_config(build, total_steps=2, **one), split)
  train(_config(build, total_steps=4, **one), split)
  assert losses(whole) == losses(split) and sorted(losses(whole)) == [1, 2, 3, 4]
  with open(os.path.join(whole, "metrics.jsonl"), encoding="utf-8") as f:
    last = [json.loads(line) for line in f if "train/loss" in line][-1]
  assert last["train/useful_share"] > 0.6, last["train/useful_share"]
  # The eval binary's library function on the packed run's checkpoint (the scene suite).
  results = run_eval(_config(build, **one, eval__max_prompt_length=64), whole)
  assert results["step"] == 4 and 0 <= results["results"]["16"]["average"] <= 1, results


def test_a_packed_weighted_mixture_counts_conversations_per_source(build, tmp_path):
  config = _config(build, total_steps=2, checkpoint_every=2, data__num_examples=200,
                   data__mixture=(("llava", build[0], 1.0), ("procedural", "", 1.0)))
  train(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    last = [json.loads(line) for line in f if "train/loss" in line][-1]
  from_llava, from_scenes = (last["train/examples_from/0_llava"],
                             last["train/examples_from/1_procedural"])
  # Conversations, not rows: more than the 2 steps x 8 rows, from both sources.
  assert from_llava > 0 and from_scenes > 0 and from_llava + from_scenes > 16


def test_a_bad_image_is_left_out_of_its_row_under_skip(build, tmp_path):
  source, _, spec = _packed(build, data__on_bad_record="skip")
  stream = grain_stream(build, spec)
  broken = next(i for i in range(60) if stream[i]["images"])
  bad = BrokenImage(stream, broken)
  shape = pipeline.row_shape(spec.data)
  tok = _tokenizer(build)
  preprocess = pipeline.make_transform(spec.data, lambda: tok)
  kwargs = dict(names=(), source_key="_source", reason_key="_bad_record_reason",
                encode_reason=pipeline._encode_reason)  # pylint: disable=protected-access
  skipping = pipeline.packed_rows.PackedRows(bad, preprocess, shape, SIZE, tok.pad_id,
                                             skip=True, **kwargs)
  r = next(r for r in range(len(skipping)) if broken in skipping.members(r))
  row = skipping[r]
  reasons = [bytes(x).rstrip(b"\0") for x in row["_bad_record_reason"]]
  assert reasons == [b"unreadable image"] + [b""] * (len(reasons) - 1)
  assert row["segments"].max() == len(skipping.members(r)) - 1  # the others are kept
  stopping = pipeline.packed_rows.PackedRows(bad, preprocess, shape, SIZE, tok.pad_id, **kwargs)
  with pytest.raises(InputError, match="unreadable image"):
    stopping[r]


class Stream:
  """``n`` conversations of 5 text tokens and an image; reading ``unreadable`` ones fails."""

  def __init__(self, n, unreadable=()):
    self.n, self.unreadable = n, set(unreadable)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.unreadable:
      raise MalformedRowError("BUILD (train split)", i, "bad json", "x", unit="record")
    return {"i": i}


class Pieces:
  """Each conversation's `pipeline.Piece`; ``bad`` ones' images cannot be decoded."""

  def __init__(self, bad=lambda i: False):
    self.bad = bad

  def lengths(self, element):
    return pack.Lengths(5, 1)

  def piece(self, element):
    if self.bad(element["i"]):
      raise MalformedRowError("BUILD (train split)", element["i"], "unreadable image", "x",
                              unit="record")
    return pipeline.Piece(np.full(6, 7, np.int32), np.ones(6, np.float32),
                          np.zeros((1, 4, 4, 3), np.float32))


def _skipping_rows(stream, pieces):
  return pipeline.packed_rows.PackedRows(
      stream, pieces, pack.RowShape(40, 4), 4, 0, skip=True,
      reason_key="_bad_record_reason",
      encode_reason=pipeline._encode_reason)  # pylint: disable=protected-access


def test_skip_leaves_an_unreadable_conversation_out_of_the_plan():
  rows = _skipping_rows(Stream(6, unreadable={2}), Pieces())
  assert rows.left_out == {"bad json": 1}
  assert sorted(i for r in range(len(rows)) for i in rows.members(r)) == [0, 1, 3, 4, 5]


def test_skip_counts_every_bad_conversation_of_a_row():
  skipped = pipeline.SkippedRecords()
  rows = _skipping_rows(Stream(4), Pieces(lambda i: i in (1, 2)))
  assert rows.members(0) == (0, 1, 2, 3)
  next(pipeline.make_iterator(rows, pipeline.IDENTITY, 1, seed=0, on_bad_record="skip",
                              skipped=skipped))
  assert skipped.counts() == {"unreadable image": 2}


def test_skip_fills_an_all_bad_row_and_stops_a_broken_source():
  # Rows of four: row 0's conversations are all bad, so it holds row 1's.
  rows = _skipping_rows(Stream(8), Pieces(lambda i: i < 4))
  np.testing.assert_array_equal(rows[0]["segments"], rows[1]["segments"])
  assert rows[0]["segments"].max() == 4
  # Row 0's four bad conversations are counted at row 0, row 1 has none.
  assert [bytes(x).rstrip(b"\0") for x in rows[0]["_bad_record_reason"]] == [
      b"unreadable image"] * 4
  assert not rows[1]["_bad_record_reason"].any()
  broken = _skipping_rows(Stream(400), Pieces(lambda i: True))
  with pytest.raises(InputError, match="100 conversations in a row are bad"):
    broken[0]


class QATokenizer:
  """Prompt [2, 5, <image>, a word each, 6], answer [a word each, 3]."""
  pad_id, image_id = 0, 4

  def prompt_ids(self, question, image_first=True):
    return [2, 5, 4] + [9] * len(question.split()) + [6]

  def answer_ids(self, answer):
    return [10] * len(answer.split()) + [3]


def test_a_scene_question_fits_the_rows_text_capacity():
  """With K image slots a row of T slots holds C = T - K text tokens: a question of more
  is refused (skippable as "too long"), one of C is packed whole."""
  t, k = 20, 4
  pre = pipeline.QAPreprocess(QATokenizer, t, image_slots=k, image_size=4)
  image = np.zeros((4, 4, 3), np.uint8)
  at_capacity = {"question": "w " * 10, "answer": "x y", "image": image}  # 16 text tokens
  assert pre.lengths(at_capacity) == pack.Lengths(t - k, 1)
  with pytest.raises(pipeline.ExampleError, match=r"example needs 18 tokens but config.data.max_text_length is 20 \(a row of 4 "
                     r"image slots holds 17 with one image\)"):
    pre.lengths({**at_capacity, "question": "w " * 11})


def test_an_undecodable_image_of_several_is_named_by_its_place(build):
  source, _, spec = _packed(build)
  stream = grain_stream(build, spec)
  i = next(i for i in range(60) if len(stream[i]["images"]) >= 2)
  element = stream[i]
  broken = {**element, "images": (element["images"][0], b"not a png",
                                  *element["images"][2:])}
  preprocess = pipeline.make_transform(spec.data, lambda: _tokenizer(build))
  with pytest.raises(InputError, match=rf"image 2 of {len(element['images'])}: "):
    preprocess.piece(broken)


class BrokenImage:
  """A stream whose conversation ``index`` has a corrupt first image."""

  def __init__(self, stream, index):
    self._stream, self._index = stream, index

  def __len__(self):
    return len(self._stream)

  def __getitem__(self, i):
    element = self._stream[i]
    if i == self._index:
      element = {**element, "images": (b"not a png",) + tuple(element["images"][1:])}
    return element


@pytest.mark.slow
def test_a_packed_mixture_survives_three_kills_bit_identically(build, tmp_path):
  """The crash harness on packed rows of a LLaVA build (several images, text-only rows)
  mixed with the procedural suite: 3 SIGKILLs, restarts, the same state as an
  uninterrupted run."""
  tiny = [f for f in TINY_FLAGS if "token_counts" not in f and "token_probs" not in f]
  command = [sys.executable, "-m", "tokenflex_jax.crash_test", f"--workdir={tmp_path}",
             "--kills=3", "--total_steps=10", "--checkpoint_every=2", "--seed=5", "--",
             *tiny, "--config.token_counts=(16,64)", "--config.token_probs=(0.5,0.5)",
             "--config.eval.token_counts=(16,)", "--config.data.pack=True",
             f"--config.data.max_text_length={T}", f"--config.data.image_slots={K}",
             f"--config.data.image_size={SIZE}", f"--config.model.vit.image_size={SIZE}",
             "--config.data.truncate=True", "--config.data.num_examples=200",
             "--config.tokenizer.kind=hf", f"--config.tokenizer.path={build[1]}",
             "--config.tokenizer.template=chatml",
             f"--config.tokenizer.image_token={IMAGE_TOKEN}", "--config.tokenizer.system_prompt=",
             f"--config.data.mixture=(('llava','{build[0]}',2.0),('procedural','',1.0))"]
  result = subprocess.run(command, cwd=REPO, env=binary_env(8), capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("3 kills (") and last.endswith("bit-identical=true"), last
