"""Real data formats: LLaVA JSON -> TFDS build (rebuilt when its sources change) ->
pipeline -> training steps with a Hugging Face tokenizer.json, resumed; MMBench TSV and
VQA JSONL reading and scoring; malformed rows name their file and row, or are counted and
skipped. (The eval binary on both files: tests/test_docs_whole_path.py.)"""

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.tiny import TINY_FLAGS, losses, tiny_spec
from tests.xla_env import REPO, binary_env
from tokenflex_jax import errors
from tokenflex_jax.data import llava, llava_tfds, pipeline
from tokenflex_jax.data import tokenizer as tok_lib
from tokenflex_jax.data.rows import MalformedRowError
from tokenflex_jax.evaluation import eval_files, evaluator

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
COLORS = ["red", "green", "blue", "yellow"]


def _png(color: str, size: int = 20) -> bytes:
  rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220),
         "yellow": (230, 230, 20)}[color]
  buf = io.BytesIO()
  Image.fromarray(np.full((size, size + 6, 3), rgb, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _texts():
  return [f"What colour is the picture? It is {c}. Answer with the option's letter from the "
          f"given choices directly. A. B. C. D. {c}" for c in COLORS] + [
          "Describe the image in one word. Is it bright? yes no"]


def make_hf_tokenizer(directory: str, texts: tuple[str, ...] = ()) -> str:
  """A tiny Qwen-style tokenizer.json (BPE + chatml special tokens) built locally, trained
  on the tests' texts and ``texts``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"] + SPECIALS)
  tok.train_from_iterator((_texts() + list(texts)) * 3, trainer)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A LLaVA JSON + image folder, an MMBench TSV and a VQA JSONL, all small."""
  root = tmp_path_factory.mktemp("formats")
  images = root / "images"
  images.mkdir()
  rows = []
  for i in range(16):
    color = COLORS[i % 4]
    (images / f"{i}.png").write_bytes(_png(color))
    rows.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the picture?"},
        {"from": "gpt", "value": color},
        {"from": "human", "value": "Is it bright?"},
        {"from": "gpt", "value": "yes" if color == "yellow" else "no"}]})
  for i, color in enumerate(COLORS):  # Text-only rows, trained beside the image rows.
    rows.append({"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"It is {color}. Is it bright?"},
        {"from": "gpt", "value": "yes" if color == "yellow" else "no"}]})
  (root / "train.json").write_text(json.dumps(rows))
  header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
  lines = [header]
  for i, color in enumerate(COLORS * 2):
    image = base64.b64encode(_png(color)).decode() if i < 4 else str(i - 4)  # references
    lines.append(f"{i}\tWhat colour is the picture?\tnan\t{COLORS[0]}\t{COLORS[1]}\t"
                 f"{COLORS[2]}\t{COLORS[3]}\t{'ABCD'[COLORS.index(color)]}\t"
                 f"{'warm' if color in ('red', 'yellow') else 'cold'}\t{image}\n")
  (root / "mmbench.tsv").write_text("".join(lines))
  with open(root / "vqa.jsonl", "w", encoding="utf-8") as f:
    for i, color in enumerate(COLORS):
      f.write(json.dumps({"image": f"images/{i}.png", "question": "What colour is the picture?",
                          "answers": [color] * 7 + ["dark"] * 3}) + "\n")
  make_hf_tokenizer(str(root / "tokenizer"))
  return root


def _run(module, *args):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=binary_env(8),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _hf_flags(files):
  return ("--config.tokenizer.kind=hf",
          f"--config.tokenizer.path={files}/tokenizer/tokenizer.json",
          "--config.tokenizer.template=chatml", "--config.tokenizer.image_token=<|image_pad|>")


# --- Malformed rows --------------------------------------------------------------------

def _llava_rows(tmp_path, bad_row):
  (tmp_path / "a.png").write_bytes(_png("red"))
  good = {"id": "ok", "image": "a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
  path = tmp_path / "rows.json"
  path.write_text(json.dumps([good, bad_row, good]))
  return str(path)


@pytest.mark.parametrize("bad_row, reason", [
    ({"id": "x", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A"}]},
     "missing image"),
    ({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "Q without marker"}, {"from": "gpt", "value": "A"}]},
     "no <image> marker"),
    ({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "  "}]},
     "empty answer"),
    ({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A <image>"}]},
     "<image> marker in an assistant turn"),
    ({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> Q <image>"}, {"from": "gpt", "value": "A"}]},
     "<image> markers do not match the images"),
    ({"id": "x", "image": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "<image 1> Q <image 3>"}, {"from": "gpt", "value": "A"}]},
     "<image k> beyond the images"),
    ({"id": "x", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "<image> Q"}]},
     "turns out of order"),
])
def test_malformed_llava_row_names_file_and_row_or_is_counted(tmp_path, bad_row, reason):
  path = _llava_rows(tmp_path, bad_row)
  with pytest.raises(MalformedRowError, match=rf"rows\.json: row 1: {reason}") as e:
    llava.read_llava(path, str(tmp_path))
  assert e.value.path == path and e.value.row == 1
  rows, skipped = llava.read_llava(path, str(tmp_path), skip_malformed=True)
  assert [r.row for r in rows] == [0, 2] and skipped == {reason: 1}


def test_malformed_eval_file_rows(tmp_path):
  tsv = tmp_path / "bench.tsv"
  image = base64.b64encode(_png("red")).decode()
  tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n"
                 f"0\tWhich?\tred\tblue\tA\t{image}\n"
                 f"1\tWhich?\tred\tblue\tE\t{image}\n"
                 f"2\tWhich?\tred\tblue\tB\t\n")
  with pytest.raises(MalformedRowError, match=r"bench\.tsv: row 1: unknown option letter"):
    eval_files.read_mmbench(str(tsv), 16)
  questions, skipped = eval_files.read_mmbench(str(tsv), 16, skip_malformed=True)
  assert [q.index for q in questions] == ["0"]
  assert skipped == {"unknown option letter": 1, "missing image": 1}

  jsonl = tmp_path / "vqa.jsonl"
  (tmp_path / "a.png").write_bytes(_png("red"))
  jsonl.write_text(json.dumps({"image": "a.png", "question": "Q?", "answers": ["red"]}) + "\n"
                   + json.dumps({"image": "a.png", "question": "Q?", "answers": []}) + "\n"
                   + json.dumps({"image": "b.png", "question": "Q?", "answers": ["x"]}) + "\n")
  with pytest.raises(MalformedRowError, match=r"vqa\.jsonl: row 1: empty answer"):
    eval_files.read_vqa(str(jsonl), 16)
  rows, skipped = eval_files.read_vqa(str(jsonl), 16, skip_malformed=True)
  assert len(rows) == 1 and skipped == {"empty answer": 1, "missing image": 1}


def test_a_question_too_long_for_the_prompt_names_its_file(tmp_path):
  (tmp_path / "a.png").write_bytes(_png("red"))
  jsonl = tmp_path / "vqa.jsonl"
  jsonl.write_text(json.dumps({"image": "a.png", "question": "What colour is the picture?",
                               "answers": ["red"]}) + "\n")
  spec = tiny_spec(eval__suite="vqa", eval__data_path=str(jsonl), eval__max_prompt_length=8)
  tok = tok_lib.ensure_tokenizer(str(tmp_path / "tokenizer.model"))
  with pytest.raises(errors.InputError, match=rf"^{re.escape(str(jsonl))}: question needs "
                     r"\d+ prompt tokens but config\.eval\.max_prompt_length is 8: 'What"):
    evaluator.eval_file_set(spec, tok)


# --- Scoring ---------------------------------------------------------------------------

def test_vqa_soft_accuracy_matches_the_official_formula():
  answers = ["two"] * 2 + ["3"] * 8
  assert eval_files.vqa_soft_accuracy("2", answers) == pytest.approx(0.6)   # 2 humans
  assert eval_files.vqa_soft_accuracy("Three.", answers) == pytest.approx(1.0)
  assert eval_files.vqa_soft_accuracy("four", answers) == 0.0
  assert eval_files.vqa_soft_accuracy("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
  assert eval_files.normalize_vqa_answer("The Dog's  bowl!") == "dog's bowl"
  assert eval_files.normalize_vqa_answer("None") == "0"
  assert eval_files.normalize_vqa_answer("10:30, 1,000.") == "10:30 1000"


def test_mmbench_circular_evaluation(files):
  bench = eval_files.mmbench(str(files / "mmbench.tsv"), 16)
  assert len(bench.questions) == 8 * 4 and bench.num_questions == 8  # x 4 rotations
  np.testing.assert_array_equal(bench.image_index[:8], [0, 0, 0, 0, 1, 1, 1, 1])
  assert set(bench.chance) == {"warm", "cold"}
  assert bench.chance["warm"] == pytest.approx(0.25 ** 4)
  # Referenced images (rows 4-7 point at rows 0-3) decode to the same pixels.
  np.testing.assert_array_equal(bench.images[0], bench.images[4])
  # The right option under each rotation: the answer's text is the image colour.
  right = []
  for q_num in range(8):
    color = (COLORS * 2)[q_num]
    for shift in range(4):
      rotated = COLORS[shift:] + COLORS[:shift]
      right.append("ABCD"[rotated.index(color)])
  assert bench.score(right) == {"warm": 1.0, "cold": 1.0}
  wrong_once = list(right)
  wrong_once[1] = "A" if right[1] != "A" else "B"  # question 0 (red, warm), rotation 1
  assert bench.score(wrong_once) == {"warm": 0.75, "cold": 1.0}
  assert bench.score(["(" + r + ") text" for r in right]) == {"warm": 1.0, "cold": 1.0}
  # Answers given as the option's text are read in each rotation's own order.
  texts = [(COLORS * 2)[q_num] for q_num in range(8) for _ in range(4)]
  assert bench.score(texts) == {"warm": 1.0, "cold": 1.0}
  assert bench.prompt_scores(texts).tolist() == [1.0] * 32


def test_choice_parsing_and_circular_copies_in_the_file(tmp_path):
  options = ("red", "green", "blue")
  assert eval_files.parse_choice("(c)", options) == 2
  assert eval_files.parse_choice("The answer is B.", options) == 1
  assert eval_files.parse_choice("it is green", options) == 1  # the option's text
  assert eval_files.parse_choice("green or blue", options) is None
  assert eval_files.parse_choice("D", options) is None
  assert eval_files.parse_choice("b", options) == 1 and eval_files.parse_choice("b.", options) == 1
  assert eval_files.parse_choice("a dog", ("a cat", "a dog")) == 1  # an article, not "A"
  # VLMEvalKit-style files carry the rotated copies as rows index + j * 1e6.
  image = base64.b64encode(_png("red")).decode()
  tsv = tmp_path / "circular.tsv"
  tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n"
                 f"0\tWhich?\tred\tblue\tA\t{image}\n"
                 f"1000000\tWhich?\tblue\tred\tB\t0\n")
  bench = eval_files.mmbench(str(tsv), 16)
  assert bench.num_questions == 1 and len(bench.questions) == 2
  assert bench.score(["A", "B"]) == {"all": 1.0} and bench.score(["A", "A"]) == {"all": 0.0}

# --- End to end ------------------------------------------------------------------------

def test_llava_to_tfds_to_training_and_resuming(files, tmp_path):
  data_dir = tmp_path / "tfds"
  _run("tokenflex_jax.data.llava_tfds", f"--json={files}/train.json",
       f"--image_dir={files}/images", f"--data_dir={data_dir}")
  build = llava_tfds.LlavaTfdsSource(str(data_dir))
  assert len(build) == 20
  assert sum(build[i]["images"] == () for i in range(20)) == 4  # the text-only rows, kept
  assert build[0]["turns"][0] == ("user", "<image>\nWhat colour is the picture?")

  # The pipeline: the chat template's tokens, loss on both assistant replies only.
  from tokenflex_jax.data import chat
  tok = chat.load_tokenizer(kind="hf", path=f"{files}/tokenizer/tokenizer.json",
                            template="chatml", image_token="<|image_pad|>")
  transform = pipeline.ConversationPreprocess(lambda: tok, 16, 160)
  example = transform.map(build[0])
  assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.float32
  tokens, mask = example["tokens"], example["loss_mask"]
  assert (tokens == tok.image_id).sum() == 1
  turns = build[0]["turns"]
  supervised = [int(t) for t, m in zip(tokens, mask) if m]
  assert supervised.count(tok.eos_id) == 2  # each reply ends its turn
  expected = turns[1][1] + turns[3][1]
  assert "".join(tok.decode([t]) for t in supervised).replace(" ", "").strip() == expected

  workdir = tmp_path / "run"
  # 16 px images: an 8 x 8 patch grid, so at most 64 visual tokens (config_checks).
  tiny = [f for f in TINY_FLAGS
          if not f.startswith(("--config.token_", "--config.eval.token_counts="))]
  common = (*tiny, *_hf_flags(files), "--config.data.source=llava",
            f"--config.data.tfds_dir={data_dir}", "--config.data.max_text_length=160",
            "--config.data.image_size=16", "--config.model.vit.image_size=16",
            "--config.token_counts=(64,)", "--config.token_probs=(1.0,)",
            "--config.eval.token_counts=(16,64)")
  _run("tokenflex_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
       "--config.total_steps=2", "--config.checkpoint_every=2", *common)
  resumed = _run("tokenflex_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
                 "--config.total_steps=3", "--config.checkpoint_every=2", *common)
  assert "at step 2" in resumed.stderr  # Image and text-only rows together, resumed.
  recorded = losses(str(workdir))
  assert sorted(recorded) == [1, 2, 3] and all(np.isfinite(l) for l, _ in recorded.values())

  # The eval binary on an MMBench TSV and a VQA JSONL: tests/test_docs_whole_path.py.


def test_a_llava_build_rebuilds_when_its_sources_change(files, tmp_path, caplog):
  """Built once; built again unchanged: reused; after a row is added to the JSON, or an
  image file is replaced, or with --skip_malformed: rebuilt, a warning naming the change."""
  source = tmp_path / "rows.json"
  rows = json.loads((files / "train.json").read_text())
  source.write_text(json.dumps(rows[:6]))
  data_dir = str(tmp_path / "tfds")

  def build(**kw):
    caplog.clear()
    with caplog.at_level("INFO"):
      folder = llava_tfds.build(data_dir, str(source), str(files / "images"), **kw)
    return len(llava_tfds.LlavaTfdsSource(folder)), [
        r.getMessage() for r in caplog.records
        if r.levelname == "WARNING" and r.filename == "llava_tfds.py"]

  assert build() == (6, [])
  assert build() == (6, [])  # unchanged: reused
  assert any("its sources have not changed" in r.getMessage() for r in caplog.records)
  rows[0]["conversations"][1]["value"] = "crimson"  # a fixed row
  source.write_text(json.dumps(rows[:6]))
  count, warned = build()
  assert count == 6 and len(warned) == 1, warned
  assert re.fullmatch(r"rebuilding .*/llava_conversations/rows/1\.1\.0: the JSON file's "
                      r"contents changed since it was built", warned[0]), warned
  folder = str(tmp_path / "tfds" / "llava_conversations" / "rows" / "1.1.0")
  answers = {r["id"]: r["turns"][1][1] for r in llava_tfds.LlavaTfdsSource(folder)}
  assert answers["q0"] == "crimson"
  source.write_text(json.dumps(rows[:7]))  # a row added, with its image
  count, warned = build()
  assert count == 7 and warned[0].endswith("the JSON file's contents changed; the image files "
                                           "its rows name changed since it was built"), warned
  image = files / "images" / "3.png"
  original = image.read_bytes()
  try:
    image.write_bytes(_png("blue"))
    os.utime(image, ns=(1, 1))  # a replaced file: another modification time
    count, warned = build()
    assert count == 7 and warned[0].endswith(": the image files its rows name changed since "
                                             "it was built"), warned
  finally:
    image.write_bytes(original)
  count, warned = build(skip_malformed=True)
  assert "--skip_malformed changed" in warned[0], warned
  broken = rows[:7] + [{"id": "bad", "image": "0.png", "conversations": [
      {"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": " "}]}]
  source.write_text(json.dumps(broken))  # a rebuild that fails keeps the old build
  with pytest.raises(MalformedRowError, match="empty answer"):
    build()
  assert len(llava_tfds.LlavaTfdsSource(folder)) == 7
  assert [p for p in os.listdir(tmp_path / "tfds") if p.startswith(".rebuild-")] == []
  source.write_text(json.dumps(rows[:7]))
  os.remove(os.path.join(folder, llava_tfds.SOURCE_FILE))  # a build from before fingerprints
  count, warned = build(skip_malformed=True)
  assert warned[0].endswith(": it records no source fingerprint (built before builds "
                            "recorded one)"), warned
