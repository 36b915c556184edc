"""Eval files in the formats people have (MMBench TSV, VQA JSONL): reading and scoring.

(Step timing is another module: `tokenflex_jax.bench`.)

* MMBench-style TSV: columns ``index, question, hint, A, B, C, D[, E...], answer,
  category, image`` (base64; a short all-digit image field refers to the row with that
  index, as MMBench stores repeated images). Scored as multiple choice with circular
  evaluation: a question with k options is asked k times with the options rotated, and
  counts as correct only if every rotation is answered correctly. Files that already
  hold the rotated copies (VLMEvalKit's: index + j * 1e6) are read for their original
  rows only (index < 1e6); the rotations are made here.
* VQA JSONL: one object per line, ``{"image": path, "question": str, "answers": [str]}``
  (image relative to the file's folder unless absolute; optional ``category``). Scored
  with the VQA soft accuracy: min(1, matching human answers / 3), averaged over the
  leave-one-out subsets of the human answers, after the VQA answer normalisation.

A malformed row raises `rows.MalformedRowError` naming the file and row (rows count
from 0 among the data rows), or with ``skip_malformed`` is left out and counted.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import os
import re
import string
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from tokenflex_jax import paths

from tokenflex_jax.data.images import ImageError
from tokenflex_jax.data.pipeline import decode_image
from tokenflex_jax.data.rows import (INVALID_UTF8, MalformedRowError, bad_text, collect_rows,
                                     data_lines, json_line, read_text)
from tokenflex_jax.errors import InputError

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
CIRCULAR_COPY_OFFSET = 1_000_000
LETTERS = string.ascii_uppercase


@dataclasses.dataclass
class EvalFile:
  """Questions ready for generation and a scorer for the generated answers.

  images: uint8 [M, H, W, 3] decoded at the eval resolution; questions: N prompt texts
  (the image goes where the chat template puts it); image_index: int [N], the image of
  each prompt (MMBench's rotations share one); num_questions: what is scored (N, or the
  MMBench questions before rotation); score(predictions) -> {family: accuracy}; chance:
  {family: accuracy of random guessing}; skipped: {reason: rows}; prompt_scores(
  predictions) -> float [N] in [0, 1], each prompt's own credit (an MMBench rotation
  answered right, a VQA soft accuracy).
  """
  images: np.ndarray
  questions: list[str]
  image_index: np.ndarray
  num_questions: int
  score: Callable[[Sequence[str]], dict[str, float]]
  chance: dict[str, float]
  skipped: dict[str, int]
  prompt_scores: Callable[[Sequence[str]], np.ndarray]


def _decode(data: bytes, size: int, path: str, row: int, what: str) -> np.ndarray:
  """`pipeline.decode_image`, with a corrupt, truncated or too large image (or one of an
  unsupported mode) reported as a malformed row."""
  try:
    return decode_image(data, size)
  except ImageError as e:
    raise MalformedRowError(path, row, e.reason, f"{what}: {e}") from None


# --- MMBench ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChoiceQuestion:
  index: str
  question: str
  hint: str
  options: tuple[str, ...]   # in letter order A, B, ...
  answer: int                # index into options
  category: str
  image: np.ndarray


def mc_prompt(question: str, hint: str, options: Sequence[str]) -> str:
  """The LLaVA-style multiple-choice prompt: hint, question, lettered options, instruction."""
  lines = ([hint] if hint else []) + [question]
  lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_INSTRUCTION]
  return "\n".join(lines)


def parse_choice(text: str, options: Sequence[str]) -> int | None:
  """The option a generated answer names: a letter ("B", "b.", "(b)", "(B) cat", "The
  answer is B") or, failing that, exactly one option's text. None if it names none. A
  leading lowercase letter counts only as "b", "b." or "(b)": "a dog" is a text."""
  valid = LETTERS[:len(options)]
  text = text.strip()
  m = (re.match(r"^\(?([A-Z])(?:[.):\s]|$)", text)
       or re.match(r"^\(?([a-z])(?:[.)]|\)?$)", text))
  if m and m.group(1).upper() in valid:
    return valid.index(m.group(1).upper())
  found = [f for f in re.findall(r"\b([A-Z])\b", text) if f in valid]
  if found:
    return valid.index(found[0])
  named = [i for i, o in enumerate(options) if o.strip().lower() in text.lower()]
  return named[0] if len(named) == 1 else None


_REQUIRED_COLUMNS = ("question", "answer", "image", "A", "B")
_DIGITS = re.compile(r"[0-9]+")


_MMBENCH_NEEDS = ("an MMBench TSV needs the columns index, question, A, B, [C, D, ...], "
                  "answer, image")


def tsv_rows(path: str, required: Sequence[str] = _REQUIRED_COLUMNS,
             needs: str = _MMBENCH_NEEDS) -> list[tuple[int, dict[str, str] | MalformedRowError]]:
  """A TSV's data rows as (row number from 0, {column: value}), or the
  `MalformedRowError` of a row that is not valid UTF-8 or not a TSV row (read per row,
  so one bad row names itself). A header without the ``required`` columns is an
  `InputError` saying what the file ``needs``."""
  csv.field_size_limit(1 << 30)
  reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t")
  try:
    header = next(reader, None)
  except csv.Error as e:
    raise InputError(f"{path}: line 1 (the header): not a TSV header: {e}") from None
  found = bad_text(header or [], "the header")
  if header is None or found or not set(required) <= set(header):
    raise InputError(f"{path}: line 1 (the header): {needs}; "
                     f"{found or f'found {sorted(header or [])!r:.300}'}")
  rows: list[tuple[int, dict[str, str] | MalformedRowError]] = []
  while True:
    i = len(rows)
    try:
      fields = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      rows.append((i, MalformedRowError(path, i, "not a TSV row",
                                        f"line {reader.line_num}: {e}")))
      continue
    if not fields or not any(f.strip() for f in fields):
      continue  # a blank line
    if len(fields) < len(header) or any(f.strip() for f in fields[len(header):]):
      rows.append((i, MalformedRowError(path, i, "wrong number of columns",
                                        f"{len(fields)} fields for {len(header)} columns")))
      continue
    broken = next((j for j, field in enumerate(fields) if bad_text(field)), None)
    if broken is not None:
      column = repr(header[broken]) if broken < len(header) else f"{broken + 1} (extra)"
      rows.append((i, MalformedRowError(path, i, INVALID_UTF8, f"column {column}: "
                                        f"{bad_text(fields[broken])}")))
      continue
    rows.append((i, dict(zip(header, fields))))
  return rows


def read_mmbench(path: str, image_size: int, skip_malformed: bool = False
                 ) -> tuple[list[ChoiceQuestion], dict[str, int]]:
  """Reads an MMBench TSV; returns (questions, {reason: rows skipped}).

  Rows are numbered from 0 among the data rows of the file (blank lines left out);
  each is decoded on its own: bytes that are not UTF-8 make their row "invalid UTF-8".
  """
  rows = tsv_rows(path)
  valid = [(i, r) for i, r in rows if isinstance(r, dict)]
  by_index = {r.get("index") or str(i): r for i, r in valid}
  # Circular copies (index >= 1e6) repeat an original row with rotated options.
  rows = [(i, r) for i, r in rows if not isinstance(r, dict)
          or not _DIGITS.fullmatch(r.get("index") or "")
          or int(r["index"]) < CIRCULAR_COPY_OFFSET]

  def parse(i: int, row: dict[str, str] | MalformedRowError) -> ChoiceQuestion:
    if isinstance(row, MalformedRowError):
      raise row
    bad = lambda reason, detail: MalformedRowError(path, i, reason, detail)
    index = (row.get("index") or "").strip() or str(i)
    options = []
    for letter in LETTERS:
      value = (row.get(letter) or "").strip()
      if letter not in row or not value or value.lower() == "nan":
        break
      options.append(value)
    if len(options) < 2:
      raise bad("fewer than two options", f"index {index}")
    after = [letter for letter in LETTERS[len(options) + 1:]
             if (row.get(letter) or "").strip().lower() not in ("", "nan")]
    if after:
      raise bad("gap in the options", f"index {index}: option {LETTERS[len(options)]} is "
                f"empty but {', '.join(after)} {'is' if len(after) == 1 else 'are'} not")
    answer = (row.get("answer") or "").strip()
    if len(answer) != 1 or answer not in LETTERS[:len(options)]:
      raise bad("unknown option letter",
                f"index {index}: answer {answer!r} is not one of {LETTERS[:len(options)]}")
    if not (row.get("question") or "").strip():
      raise bad("empty question", f"index {index}")
    image = (row.get("image") or "").strip()
    if _DIGITS.fullmatch(image) and len(image) < 32:  # a reference to another row's image
      image = (by_index.get(image) or {}).get("image", "").strip()
    if not image:
      raise bad("missing image", f"index {index}")
    try:
      data = base64.b64decode(image, validate=True)
    except ValueError as e:
      raise bad("missing image", f"index {index}: the image is not base64 ({e})") from None
    hint = (row.get("hint") or "").strip()
    return ChoiceQuestion(index, row["question"].strip(), "" if hint.lower() == "nan" else hint,
                          tuple(options), LETTERS.index(answer),
                          (row.get("category") or "").strip() or "all",
                          _decode(data, image_size, path, i, f"index {index}"))

  return collect_rows(rows, lambda _, numbered: parse(*numbered), skip_malformed)


def mmbench(path: str, image_size: int, skip_malformed: bool = False) -> EvalFile:
  """Circular multiple choice: each k-option question is asked k times, rotated."""
  questions, skipped = read_mmbench(path, image_size, skip_malformed)
  prompts, image_index = [], []
  asked = []  # (question number, the options in the order asked, the right one's index)
  for q_num, q in enumerate(questions):
    k = len(q.options)
    for shift in range(k):
      rotated = q.options[shift:] + q.options[:shift]
      prompts.append(mc_prompt(q.question, q.hint, rotated))
      image_index.append(q_num)
      asked.append((q_num, rotated, (q.answer - shift) % k))
  categories = sorted({q.category for q in questions})

  def score(predictions: Sequence[str]) -> dict[str, float]:
    correct = np.ones(len(questions), bool)
    for (q_num, options, answer), text in zip(asked, predictions, strict=True):
      if parse_choice(text, options) != answer:
        correct[q_num] = False
    cats = np.array([q.category for q in questions])
    return {c: float(correct[cats == c].mean()) for c in categories}

  def prompt_scores(predictions: Sequence[str]) -> np.ndarray:
    return np.array([float(parse_choice(text, options) == answer)
                     for (_, options, answer), text in zip(asked, predictions, strict=True)])

  chance = {c: float(np.mean([(1 / len(q.options)) ** len(q.options) for q in questions
                              if q.category == c])) for c in categories}
  return EvalFile(_stack([q.image for q in questions], image_size), prompts,
                  np.array(image_index, np.int64), len(questions), score, chance, skipped,
                  prompt_scores)


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


# --- VQA -------------------------------------------------------------------------------

_NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't",
                 "cant": "can't", "wont": "won't", "im": "i'm", "ive": "i've",
                 "youre": "you're", "thats": "that's", "whats": "what's", "wasnt": "wasn't"}
# The official VQA evaluation's punctuation list (":", "%", "$", ... are kept).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_vqa_answer(text: str) -> str:
  """The official VQA evaluation's answer normalisation, its period rule as written there:
  punctuation (removed next to a space or inside a number, else a space), periods
  outside numbers, lower case, number words to digits, articles, and 12 of its
  contractions."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text):
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  text = _PERIOD_STRIP.sub("", text).lower()
  words = []
  for w in text.split():
    w = _NUMBERS.get(w, w)
    if w not in _ARTICLES:
      words.append(_CONTRACTIONS.get(w, w))
  return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """mean over i of min(1, #{j != i: answers[j] == prediction} / 3), normalised answers."""
  pred = normalize_vqa_answer(prediction)
  gts = [normalize_vqa_answer(a) for a in answers]
  if len(gts) == 1:
    return float(pred == gts[0])
  matches = sum(g == pred for g in gts)
  return float(np.mean([min(1.0, (matches - (g == pred)) / 3) for g in gts]))


def read_vqa(path: str, image_size: int, skip_malformed: bool = False, image_dir: str = ""
             ) -> tuple[list[tuple[np.ndarray, str, list[str], str]], dict[str, int]]:
  """Reads a VQA JSONL; returns ([(image, question, answers, category)], skipped)."""
  folder = image_dir or os.path.dirname(paths.absolute(path))
  lines = data_lines(read_text(path))  # rows: the non-empty lines, each decoded on its own

  def parse(i: int, line: str):
    bad = lambda reason, detail: MalformedRowError(path, i, reason, detail)
    row = json_line(line, path, i)
    if not isinstance(row, dict):
      raise bad("not an object", type(row).__name__)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
      raise bad("empty question", f"{row.get('question_id', '')!r:.80}")
    answers = row.get("answers")
    if isinstance(answers, str):
      answers = [answers]
    if not isinstance(answers, list):
      raise bad("empty answer", f"question {question!r:.80}: 'answers' is "
                f"{type(answers).__name__}, not a list")
    answers = [a.get("answer", "") if isinstance(a, dict) else a for a in answers]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
      raise bad("empty answer", f"question {question!r:.80}: answers {answers!r:.80}")
    category = row.get("category")
    if category is not None and not isinstance(category, (str, int)):
      raise bad("mistyped category", f"{type(category).__name__}")
    image = row.get("image")
    image_path = os.path.join(folder, image) if isinstance(image, str) and image else ""
    if not image_path or not paths.is_file(image_path):
      raise bad("missing image", f"{image_path or 'no image field'}"[:300])
    try:
      data = epath.Path(image_path).read_bytes()
    except OSError as e:
      raise bad("unreadable image", f"{image_path}: {e}") from None
    pixels = _decode(data, image_size, path, i, image_path)
    return pixels, question.strip(), answers, "vqa" if category in (None, "") else str(category)

  return collect_rows(lines, parse, skip_malformed)


def vqa(path: str, image_size: int, skip_malformed: bool = False, image_dir: str = "",
        instruction: str = VQA_INSTRUCTION) -> EvalFile:
  """Each question, followed by ``instruction`` on a new line (LLaVA's short-answer
  prompt; "" for none), scored with the VQA soft accuracy."""
  rows, skipped = read_vqa(path, image_size, skip_malformed, image_dir)
  categories = sorted({r[3] for r in rows})
  cats = np.array([r[3] for r in rows])

  def prompt_scores(predictions: Sequence[str]) -> np.ndarray:
    return np.array([vqa_soft_accuracy(p, r[2]) for p, r in zip(predictions, rows, strict=True)])

  def score(predictions: Sequence[str]) -> dict[str, float]:
    acc = prompt_scores(predictions)
    return {c: float(acc[cats == c].mean()) for c in categories}

  prompts = [f"{r[1]}\n{instruction}" if instruction else r[1] for r in rows]
  return EvalFile(_stack([r[0] for r in rows], image_size), prompts,
                  np.arange(len(rows)), len(rows), score, {c: 0.0 for c in categories},
                  skipped, prompt_scores)
