"""The paper's eight benchmarks in VLMEvalKit's TSV layouts, scored by its rule-based path.

A benchmark is recognised by its file name as VLMEvalKit names it (`BENCHMARKS`), or
named. Its scorer takes the benchmark's rows and one prediction per row (by ``index``)
and returns VLMEvalKit's metrics under VLMEvalKit's names (VLMEvalKit at commit e8e78f0,
2026-08-18; the rules: `matching`, docs/benchmarks.md):

- MMBench_DEV_EN_V11: multiple choice, circular: the file holds each question's rotated
  copies (index + k * 1e6), and a question counts only if every copy is answered right;
  ``Overall`` over questions, then the ``l2-category`` (abbreviated) and ``category``
  accuracies, per ``split``.
- MMStar, AI2D_TEST: multiple choice, each row on its own (vanilla).
- MMMU_DEV_VAL: vanilla multiple choice per split (dev, validation; the headline is
  validation's); an open question is scored as choosing between its answer (A) and
  "Other Answers" (B).
- HallusionBench: yes / no; ``aAcc`` (questions), ``fAcc`` (figures with every question
  right), ``qAcc`` (questions right on every figure), in percent.
- OCRBench: the answer list's substring rule; counts per category group and
  ``Final Score`` out of 1000.
- MathVista_MINI: the rule-based part of VLMEvalKit's scoring (its "prefetch"); the rows
  it leaves to a judge count as wrong, as with a judge that always fails, and their share
  is reported (``needs_judge_share``).
- MMVet: needs a GPT judge; no score is claimed.

Accuracies are fractions in [0, 1] where VLMEvalKit writes fractions, percentages where it
writes percentages.
"""

from __future__ import annotations

import ast
import os
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax.errors import InputError
from tokenflex_jax.evaluation import matching
from tokenflex_jax.evaluation.eval_files import CIRCULAR_COPY_OFFSET, tsv_rows
from tokenflex_jax.data.rows import MalformedRowError

BENCHMARKS = ("MMBench_DEV_EN_V11", "MMStar", "AI2D_TEST", "HallusionBench", "OCRBench",
              "MMMU_DEV_VAL", "MathVista_MINI", "MMVet")
MULTIPLE_CHOICE = ("MMBench_DEV_EN_V11", "MMStar", "AI2D_TEST", "MMMU_DEV_VAL")
REQUIRED = {name: ("index", "question", "answer") for name in BENCHMARKS}
REQUIRED.update({"MMBench_DEV_EN_V11": ("index", "question", "answer", "A", "B"),
                  "MMStar": ("index", "question", "answer", "A", "B"),
                  "AI2D_TEST": ("index", "question", "answer", "A", "B"),
                  "OCRBench": ("index", "question", "answer", "category"),
                  "MathVista_MINI": ("index", "question", "answer", "question_type",
                                     "answer_type")})

# pandas' default missing values: VLMEvalKit reads its TSVs with pandas, so an option
# cell holding one of these is no option.
MISSING = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                     "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                     "nan", "null"])
MMB_ABBREVIATIONS = {"coarse_perception": "CP",
                     "finegrained_perception (instance-level)": "FP-S",
                     "finegrained_perception (cross-instance)": "FP-C",
                     "logic_reasoning": "LR", "relation_reasoning": "RR",
                     "attribute_reasoning": "AR"}
MC_SUFFIX = "Please select the correct answer from the options above. \n"
OTHER_ANSWERS = "Other Answers"


def recognise(path: str, name: str = "") -> str:
  """The benchmark of ``path``: ``name`` if given, else the file's name without its
  extension (VLMEvalKit's, e.g. MMStar.tsv). An unknown one is an `InputError`."""
  found = name or os.path.splitext(os.path.basename(path))[0]
  if found not in BENCHMARKS:
    raise InputError(f"{path}: unknown benchmark {found!r}: name the file as VLMEvalKit "
                     f"does or pass --benchmark, one of {', '.join(BENCHMARKS)}")
  return found


def missing(value: Any) -> bool:
  return value is None or str(value) in MISSING


def read_rows(path: str, required: Sequence[str]) -> list[dict[str, str]]:
  """A TSV's rows as {column: text}; a malformed row or a missing column is an
  `InputError` naming the file and row."""
  needs = f"the columns {', '.join(required)}"
  out = []
  for _, row in tsv_rows(path, required, needs):
    if isinstance(row, MalformedRowError):
      raise InputError(str(row))
    out.append(row)
  return out


def choices(row: Mapping[str, str]) -> dict[str, str]:
  """{letter: option text} of the option columns A..Z a row fills, in letter order."""
  return {c: row[c] for c in string.ascii_uppercase if c in row and not missing(row[c])}


def mc_prompt(row: Mapping[str, str]) -> str:
  """VLMEvalKit's multiple-choice prompt: "Hint: ..." (if any), "Question: ...", the
  options as "A. ..." lines and the closing instruction (none for an open question)."""
  text = "" if missing(row.get("hint")) else f"Hint: {row['hint']}\n"
  text += f"Question: {row['question']}\n"
  options = choices(row)
  if options:
    text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MC_SUFFIX
  return text


def prompt(benchmark: str, row: Mapping[str, str]) -> str:
  """The question as VLMEvalKit's dataset asks it: `mc_prompt` for multiple choice, the
  question text for the others (MathVista's already holds its hint and choices)."""
  return mc_prompt(row) if benchmark in MULTIPLE_CHOICE else row["question"]


def paired(rows: Sequence[Mapping[str, str]], predictions: Mapping[str, str], path: str
           ) -> list[str]:
  """Each row's prediction; a row without one, or a prediction without a row, is an
  `InputError` naming the index."""
  indices = {row["index"] for row in rows}
  extra = next((i for i in predictions if i not in indices), None)
  if extra is not None:
    raise InputError(f"{path}: prediction for index {extra!r}, which the benchmark lacks")
  lacking = next((row["index"] for row in rows if row["index"] not in predictions), None)
  if lacking is not None:
    raise InputError(f"{path}: no prediction for index {lacking!r}")
  return [predictions[row["index"]] for row in rows]


def _accuracies(rows: Sequence[Mapping[str, str]], hits: Sequence[int]) -> dict[str, Any]:
  """VLMEvalKit's ``report_acc``: per split, Overall, then each l2-category (abbreviated)
  and each category, sorted."""
  out = {}
  split_of = [r.get("split") or "none" for r in rows]
  for split in sorted(set(split_of)):
    chosen = [i for i, s in enumerate(split_of) if s == split]
    mean = lambda keep: float(np.mean([hits[i] for i in chosen if keep(i)]))
    res = {"Overall": mean(lambda i: True)}
    for column, names in (("l2-category", MMB_ABBREVIATIONS), ("category", {})):
      if column in rows[0]:
        for value in sorted({rows[i][column] for i in chosen}):
          res[names.get(value, value)] = mean(lambda i, v=value: rows[i][column] == v)
    out[split] = res
  return out


def score_multiple_choice(benchmark: str, rows: Sequence[Mapping[str, str]],
                          predictions: Sequence[str]) -> dict[str, Any]:
  """{"splits": {split: {"Overall", <category>: ...}}, "Overall": the headline}."""
  if benchmark == "MMMU_DEV_VAL":
    rows = [dict(r, A=r["answer"], B=OTHER_ANSWERS) if missing(r.get("A")) else r for r in rows]
  # MMMU's answers that are no option letter (its open questions) are option A.
  truth = [r["answer"] if benchmark != "MMMU_DEV_VAL" or (
      len(r["answer"]) == 1 and r["answer"] in string.ascii_uppercase) else "A" for r in rows]
  hits = [int(matching.infer_choice(p, choices(r)) == t)
          for r, p, t in zip(rows, predictions, truth)]
  if benchmark == "MMBench_DEV_EN_V11":
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
      groups[int(r["index"]) % CIRCULAR_COPY_OFFSET].append(i)
    main = [i for i, r in enumerate(rows) if int(r["index"]) < CIRCULAR_COPY_OFFSET]
    hits = [int(all(hits[j] for j in groups[int(rows[i]["index"])])) for i in main]
    rows = [rows[i] for i in main]
  splits = _accuracies(rows, hits)
  headline = splits.get("validation", next(iter(splits.values())))["Overall"] if len(
      splits) > 1 else next(iter(splits.values()))["Overall"]
  return {"splits": splits, "Overall": headline, "questions": len(rows)}


def score_hallusionbench(rows: Sequence[Mapping[str, str]], predictions: Sequence[str]
                         ) -> dict[str, Any]:
  """{"aAcc", "fAcc", "qAcc"} overall (percent), and "splits": the same per category
  and l2-category."""
  score = [r["answer"] == matching.yes_or_no(p) for r, p in zip(rows, predictions)]
  fields = [r["index"].split("_") for r in rows]
  if any(len(f) < 6 for f in fields):
    bad = next(r["index"] for r, f in zip(rows, fields) if len(f) < 6)
    raise InputError(f"HallusionBench index {bad!r}: expected category_subcategory_"
                     "visual_set_figure_question")

  def rating(chosen: list[int]) -> dict[str, float]:
    figure, question = defaultdict(list), defaultdict(list)
    for i in chosen:
      l2 = rows[i].get("l2-category", "")
      figure[f"{l2}_{fields[i][3]}_{fields[i][4]}"].append(score[i])
      question[f"{l2}_{fields[i][3]}_{fields[i][5]}"].append(score[i])
    return {"aAcc": 100 * float(np.mean([score[i] for i in chosen])),
            "fAcc": 100 * float(np.mean([all(v) for v in figure.values()])),
            "qAcc": 100 * float(np.mean([all(v) for v in question.values()]))}

  out: dict[str, Any] = rating(list(range(len(rows))))
  out["splits"] = {}
  for column in ("category", "l2-category"):
    if column in rows[0]:
      for value in sorted({r[column] for r in rows}):
        out["splits"][value] = rating([i for i, r in enumerate(rows) if r[column] == value])
  out["questions"] = len(rows)
  return out


OCR_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition",
                   "Artistic Text Recognition", "Handwriting Recognition",
                   "Digit String Recognition", "Non-Semantic Text Recognition")
OCR_GROUPS = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
              matching.HANDWRITTEN_MATH)


def _literal(text: str, what: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise InputError(f"{what}: not a Python literal: {text!r:.100}") from None


def score_ocrbench(rows: Sequence[Mapping[str, str]], predictions: Sequence[str]
                   ) -> dict[str, Any]:
  """Counts per category group, "Final Score" (their sum, at most 1000 on the real file)
  and "Final Score Norm" (a tenth of it)."""
  counts: dict[str, int] = defaultdict(int)
  for r, p in zip(rows, predictions):
    if r["category"] not in OCR_RECOGNITION + OCR_GROUPS:
      raise InputError(f"OCRBench index {r['index']}: unknown category {r['category']!r}")
    answers = _literal(r["answer"], f"OCRBench index {r['index']} answer")
    answers = [answers] if isinstance(answers, str) else list(answers)
    counts[r["category"]] += matching.ocr_match(p, [str(a) for a in answers], r["category"])
  out: dict[str, Any] = {"Text Recognition": sum(counts[c] for c in OCR_RECOGNITION)}
  out.update({c: counts[c] for c in OCR_GROUPS})
  out["Final Score"] = sum(out.values())
  out["Final Score Norm"] = out["Final Score"] / 10
  return out


def _mathvista_check(r: Mapping[str, str], response: str, prefetch: bool) -> Any:
  """VLMEvalKit's MathVista ``post_check``, bugs included: the answer ``res`` found
  (prefetch) or whether it is right."""
  res, ans = None, r["answer"]
  try:
    if r["question_type"] == "multi_choice":
      ans = r.get("answer_option", "")
      options = _literal(r["choices"], f"MathVista index {r['index']} choices")
      res = matching.can_infer(response, dict(zip(string.ascii_uppercase, options))) or False
      if prefetch:
        return res
    elif r["answer_type"] == "integer":
      res, ans = int(response), int(r["answer"])
    elif r["answer_type"] == "float":
      res, ans = float(response), float(r["answer"])
    else:
      res, ans = str(res), str(ans)
  except ValueError:
    pass
  if res == ans:
    return res if prefetch else True
  return False


def score_mathvista(rows: Sequence[Mapping[str, str]], predictions: Sequence[str]
                    ) -> dict[str, Any]:
  """Per "Overall", task and skill: {"tot", "prefetch", "hit", "prefetch_rate", "acc"}
  (rates in percent), with the rows VLMEvalKit would send to its judge counted wrong;
  "needs_judge_share": their share."""
  tot, fetched, hit = defaultdict(int), defaultdict(int), defaultdict(int)
  for r, p in zip(rows, predictions):
    try:
      skills = ast.literal_eval(r.get("skills", "[]"))
    except (ValueError, SyntaxError):
      skills = [r["skills"]]
    keys = ["Overall", *skills, r.get("task", "")]
    res = _mathvista_check(r, p, prefetch=True)
    found = bool(res)
    right = found and _mathvista_check(r, str(res), prefetch=False) if r[
        "question_type"] == "multi_choice" else found
    for k in keys:
      tot[k] += 1
      fetched[k] += found
      hit[k] += bool(right)
  table = {k: {"tot": tot[k], "prefetch": fetched[k], "hit": hit[k],
               "prefetch_rate": 100 * fetched[k] / tot[k], "acc": 100 * hit[k] / tot[k]}
           for k in tot}
  return {"acc": table["Overall"]["acc"], "Task&Skill": table,
          "needs_judge_share": 1 - fetched["Overall"] / tot["Overall"]}


def score(benchmark: str, rows: Sequence[Mapping[str, str]], predictions: Sequence[str]
          ) -> dict[str, Any]:
  """``{"benchmark": benchmark, <VLMEvalKit's metrics>...}`` for one prediction per row.
  A prediction pandas reads as missing ("", "None", "N/A", ...) is scored as "nan", the
  text VLMEvalKit's scorers get back from its predictions file."""
  predictions = ["nan" if missing(p) else p for p in predictions]
  if benchmark in MULTIPLE_CHOICE:
    figures = score_multiple_choice(benchmark, rows, predictions)
  elif benchmark == "HallusionBench":
    figures = score_hallusionbench(rows, predictions)
  elif benchmark == "OCRBench":
    figures = score_ocrbench(rows, predictions)
  elif benchmark == "MathVista_MINI":
    figures = score_mathvista(rows, predictions)
  else:
    figures = {"scored": False, "needs": "a GPT judge (VLMEvalKit: gpt-4-turbo); the "
                                         "predictions file is written for one"}
  return {"benchmark": benchmark, **figures}


def check_rows(benchmark: str, rows: Sequence[Mapping[str, str]], path: str) -> None:
  """An `InputError` naming ``path`` and the row for a row that `score` cannot read (each
  row is scored alone against an empty prediction), or for no rows at all."""
  if not rows:
    raise InputError(f"{path}: no rows")
  for i, row in enumerate(rows):
    try:
      alone = row
      if benchmark == "MMBench_DEV_EN_V11":  # a circular copy alone: as its question
        alone = dict(row, index=str(int(row["index"]) % CIRCULAR_COPY_OFFSET))
      score(benchmark, [alone], [""])
    except InputError:
      raise
    except (ArithmeticError, LookupError, StopIteration, SyntaxError, TypeError,
            ValueError) as e:
      raise InputError(f"{path}: row {i} (index {row.get('index', '?')}): {benchmark} cannot "
                       f"score it: {type(e).__name__}: {e}") from None


def score_files(data: str, predictions: str, benchmark: str = "") -> dict[str, Any]:
  """`score` of a predictions TSV (``index`` and ``prediction`` columns) against the
  benchmark TSV ``data`` (`recognise`), its rows checked first (`check_rows`)."""
  name = recognise(data, benchmark)
  rows = read_rows(data, REQUIRED[name])
  check_rows(name, rows, data)
  predicted = read_rows(predictions, ("index", "prediction"))
  by_index = {row["index"]: row["prediction"] for row in predicted}
  return score(name, rows, paired(rows, by_index, predictions))
