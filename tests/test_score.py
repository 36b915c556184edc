"""The eight benchmarks' rule-based scoring, against figures worked out by hand from
VLMEvalKit's rules (commit e8e78f0, 2026-08-18: `vlmeval/utils/matching_util.py`,
`dataset/utils/multiple_choice.py`, `yorn.py`, `image_vqa.py`, `utils/mathvista.py`)."""

import csv
import json
import re
import subprocess
import sys

import pytest

from tokenflex_jax.errors import InputError
from tokenflex_jax.evaluation import benchmarks, matching
from tokenflex_jax.evaluation.benchmarks import score_files

CHOICES = {"A": "a cat", "B": "a dog", "C": "rabbit", "D": "teddy bear"}


@pytest.mark.parametrize("prediction,expected", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("**B**", "B"),
    ("b", "Z"),                                     # letters are case sensitive
    ("The answer is B.", "B"), ("The answer is: B", "B"),
    ("answer is b", "B"), ("The answer is blue", "B"),   # the "answer is X" rule, no boundary
    ("A cat", "A"),                                 # the article read as option A
    ("A cat is sitting on the mat today", "A"),     # not in the last 4 tokens; the text rule
    ("B. Because the animal shown is clearly a dog sitting down", "Z"),
    ("Option B is correct here, definitely", "Z"),
    ("A or B", "Z"), ("rabbit", "C"), ("Rabbit.", "C"), ("B?", "Z"), ("'B'", "Z"),
    ("", "Z"), ("Z", "Z"), ("Cannot determine the answer", "Z"),
    ("teddy bear " * 20, "Z"),                      # longer than twice the options: no text
])
def test_choice_matching_follows_vlmevalkit(prediction, expected):
  assert matching.infer_choice(prediction, CHOICES) == expected


@pytest.mark.parametrize("prediction,expected", [
    ("Yes", "Yes"), ("Yes.", "Yes"), ("YES!", "Yes"), ("(Yes)", "Yes"), ("yes-", "Yes"),
    ("yes, it is", "Yes"), ("No.", "No"), ("Answer: No", "No"), ("The answer is no", "No"),
    ("**Yes**", "Unknown"), ("Yes:", "Unknown"), ("'yes'", "Unknown"), ("yes/no", "Unknown"),
    ("Yes. No.", "Unknown"), ("Nope", "Unknown"), ("", "Unknown"),
    ("Yes\n\nExplanation: there is no cat", "Unknown"),
])
def test_yes_no_extraction_follows_vlmevalkit(prediction, expected):
  assert matching.yes_or_no(prediction) == expected


def write_tsv(path, rows):
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(columns)
    for row in rows:
      writer.writerow([row.get(c, "") for c in columns])
  return str(path)


def scored(tmp_path, name, rows, predictions, **kw):
  data = write_tsv(tmp_path / f"{name}.tsv", [dict(r, image="iVBOR") for r in rows])
  pred = write_tsv(tmp_path / "pred.tsv", [dict(r, prediction=p)
                                           for r, p in zip(rows, predictions)])
  return score_files(data, pred, **kw)


def test_mmbench_is_circular_with_overall_over_questions(tmp_path):
  def q(index, options, answer, category, l2):
    row = {"index": index, "question": "What is it?", "hint": "nan", "answer": answer,
           "category": category, "l2-category": l2, "split": "dev"}
    row.update(zip("ABCD", options))
    return row
  rows = [q(1, ["cat", "dog"], "A", "image_emotion", "coarse_perception"),
          q(1000001, ["dog", "cat"], "B", "image_emotion", "coarse_perception"),
          q(2, ["red", "blue", "green"], "C", "ocr", "logic_reasoning"),
          q(1000002, ["blue", "green", "red"], "B", "ocr", "logic_reasoning"),
          q(2000002, ["green", "red", "blue"], "A", "ocr", "logic_reasoning"),
          q(3, ["yes", "no"], "A", "ocr", "logic_reasoning"),
          q(1000003, ["no", "yes"], "B", "ocr", "logic_reasoning")]
  # Question 1: both copies right ("cat" by its text); question 2: one copy wrong;
  # question 3: its second copy unanswerable ("B?" is no token).
  predictions = ["A", "cat", "The answer is C.", "B", "B", "A", "B?"]
  r = scored(tmp_path, "MMBench_DEV_EN_V11", rows, predictions)
  assert r["benchmark"] == "MMBench_DEV_EN_V11" and r["questions"] == 3
  assert r["splits"]["dev"] == {"Overall": pytest.approx(1 / 3), "CP": 1.0, "LR": 0.0,
                                "image_emotion": 1.0, "ocr": 0.0}
  assert r["Overall"] == pytest.approx(1 / 3)


def test_mmstar_and_ai2d_are_vanilla(tmp_path):
  rows = [{"index": i, "question": "q", "answer": a, "category": c, "A": "a cat",
           "B": "a dog", "C": "rabbit", "D": "None"}
          for i, a in enumerate(["B", "B", "C", "A", "C", "D"], start=1)
          for c in ["perception" if i < 4 else "reasoning"]]
  predictions = ["The answer is B.", "A dog",   # "A dog": the article is read as A
                 "rabbit", "", "C" + " because" * 300,
                 "D"]                            # D is "None": no option to choose
  for name in ("MMStar", "AI2D_TEST"):
    r = scored(tmp_path, name, rows, predictions)
    assert r["splits"] == {"none": {"Overall": pytest.approx(2 / 6),
                                    "perception": pytest.approx(2 / 3), "reasoning": 0.0}}


def test_mmmu_scores_open_questions_and_splits(tmp_path):
  def q(index, split, answer, options=()):
    row = {"index": index, "question": "<image 1> How many?", "answer": answer,
           "split": split, "category": "Math"}
    row.update(zip("ABCD", options))
    return row
  rows = [q(1, "dev", "B", ["1", "2"]), q(2, "validation", "14"), q(3, "validation", "14"),
          q(4, "validation", "14"), q(5, "validation", "C", ["x", "y", "z"])]
  predictions = ["B", "x = 14 cm",
                 "A total of 15",        # the token A: a hit, VLMEvalKit's false positive
                 "Counting each of the objects one after another gives 14 in all",  # long
                 "z"]
  r = scored(tmp_path, "MMMU_DEV_VAL", rows, predictions)
  assert r["splits"]["dev"]["Overall"] == 1.0
  assert r["splits"]["validation"] == {"Overall": 0.75, "Math": 0.75}
  assert r["Overall"] == 0.75  # the validation split's


def test_hallusionbench_question_and_figure_accuracy(tmp_path):
  rows = [{"index": f"VD_figure_0_0_{fig}_{q}", "question": "Is it?", "answer": a,
           "category": "VD", "l2-category": "VD_figure"}
          for fig, q, a in [(0, 0, "Yes"), (0, 1, "No"), (1, 0, "No"), (1, 1, "Yes")]]
  rows.append({"index": "VS_chart_1_3_0_0", "question": "Is it?", "answer": "Yes",
               "category": "VS", "l2-category": "VS_chart"})
  predictions = ["Yes.", "The answer is no", "no", "**Yes**", "yes, it is"]
  r = scored(tmp_path, "HallusionBench", rows, predictions)
  assert r["aAcc"] == pytest.approx(80.0)
  # Figures: (VD, 0, 0) right, (VD, 0, 1) not, (VS, 3, 0) right. Questions: (VD, 0, q0)
  # right on both figures, (VD, 0, q1) not, (VS, 3, 0) right.
  assert r["fAcc"] == pytest.approx(200 / 3) and r["qAcc"] == pytest.approx(200 / 3)
  assert r["splits"]["VD"] == {"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0}
  assert r["splits"]["VS_chart"] == {"aAcc": 100.0, "fAcc": 100.0, "qAcc": 100.0}


def test_ocrbench_substring_rule_and_final_score(tmp_path):
  rows = [{"index": i, "question": "Read it.", "answer": a, "category": c}
          for i, (a, c) in enumerate([
              ("['hello']", "Regular Text Recognition"),
              ("['15']", "Scene Text-centric VQA"),
              ("['x ^ 2']", "Handwritten Mathematical Expression Recognition"),
              ("['X^2']", "Handwritten Mathematical Expression Recognition"),
              ("['total', 'sum']", "Key Information Extraction"),
              ("['abc']", "Doc-oriented VQA")])]
  predictions = ["the word is HELLO", "15 km", "x^2", "x^2", "The SUM is 3", ""]
  r = scored(tmp_path, "OCRBench", rows, predictions)
  assert r == {"benchmark": "OCRBench", "Text Recognition": 1, "Scene Text-centric VQA": 1,
               "Doc-oriented VQA": 0, "Key Information Extraction": 1,
               "Handwritten Mathematical Expression Recognition": 1, "Final Score": 4,
               "Final Score Norm": 0.4}


def test_a_prediction_pandas_reads_as_missing_is_scored_as_nan(tmp_path):
  """VLMEvalKit reads its predictions back with pandas: "", "None", "N/A" ... become NaN,
  which its scorers see as the text "nan"."""
  rows = [{"index": i, "question": "Read it.", "answer": a, "category": "Doc-oriented VQA"}
          for i, a in enumerate(["['a']", "['None']", "['n/a']", "['none']"])]
  r = scored(tmp_path, "OCRBench", rows, ["", "None", "N/A", "none"])
  # "a" is in "nan" (the empty prediction's); "none" and "n/a" are not; a lowercase
  # "none" is no missing value to pandas and matches as written.
  assert r["Doc-oriented VQA"] == 2
  mc = [{"index": 1, "question": "q", "answer": "a", "A": "one", "B": "two"}]
  assert scored(tmp_path, "AI2D_TEST", mc, ["A"])["Overall"] == 0.0  # only MMMU maps to A


def test_mathvista_rule_based_part_and_the_share_left_to_a_judge(tmp_path):
  def q(index, qtype, atype, answer, **kw):
    return {"index": index, "question": "Hint: ...\nQuestion: ?", "answer": answer,
            "question_type": qtype, "answer_type": atype, "task": "math word problem",
            "skills": "['arithmetic reasoning']", "choices": "nan", **kw}
  rows = [q(1, "multi_choice", "text", "4", choices="['3', '4', '5']", answer_option="B"),
          q(2, "multi_choice", "text", "3", choices="['3', '4', '5']", answer_option="A"),
          q(3, "free_form", "integer", "14"), q(4, "free_form", "integer", "14"),
          q(5, "free_form", "integer", "0"), q(6, "free_form", "float", "1.5"),
          q(7, "free_form", "list", "[1, 2]")]
  predictions = ["(B) 4", "B",      # prefetched: one right, one wrong
                 "14", "14 cm",     # "14 cm" does not parse: left to a judge
                 "0",               # a right 0 is falsy in VLMEvalKit: left to a judge
                 "1.50", "[1, 2]"]  # list answers never score
  r = scored(tmp_path, "MathVista_MINI", rows, predictions)
  overall = r["Task&Skill"]["Overall"]
  assert overall == {"tot": 7, "prefetch": 4, "hit": 3, "prefetch_rate": pytest.approx(400 / 7),
                     "acc": pytest.approx(300 / 7)}
  assert r["acc"] == pytest.approx(300 / 7) and r["needs_judge_share"] == pytest.approx(3 / 7)
  assert r["Task&Skill"]["arithmetic reasoning"]["tot"] == 7


def test_mmvet_claims_no_score_and_errors_name_the_row(tmp_path):
  rows = [{"index": 1, "question": "What?", "answer": "cat<OR>kitten", "category": "rec"}]
  assert scored(tmp_path, "MMVet", rows, ["a cat"])["scored"] is False
  with pytest.raises(InputError, match="unknown benchmark 'results'"):
    score_files(write_tsv(tmp_path / "results.tsv", rows), str(tmp_path / "pred.tsv"))
  data = write_tsv(tmp_path / "MMStar.tsv", [{"index": 1, "question": "q", "answer": "A",
                                              "A": "x", "B": "y"},
                                             {"index": 2, "question": "q", "answer": "A",
                                              "A": "x", "B": "y"}])
  pred = write_tsv(tmp_path / "p.tsv", [{"index": 1, "prediction": "A"}])
  with pytest.raises(InputError, match="no prediction for index '2'"):
    score_files(data, pred)


@pytest.mark.parametrize("name,rows,message", [
    ("MMBench_DEV_EN_V11", [{"index": "q1", "question": "q", "answer": "A", "A": "x",
                             "B": "y"}], r"row 0 \(index q1\): MMBench_DEV_EN_V11 cannot score"),
    ("OCRBench", [{"index": 0, "question": "q", "answer": "['a']", "category": "Doc-oriented VQA"},
                  {"index": 1, "question": "q", "answer": "42", "category": "Doc-oriented VQA"}],
     r"row 1 \(index 1\): OCRBench cannot score it: TypeError"),
    ("MathVista_MINI", [{"index": 7, "question": "q", "answer": "4", "answer_type": "text",
                         "question_type": "multi_choice"}],
     r"row 0 \(index 7\): MathVista_MINI cannot score it: KeyError"),
    ("MMStar", [], r"no rows"),
])
def test_a_row_the_rules_cannot_read_is_one_line_naming_it(tmp_path, name, rows, message):
  header = {"MMBench_DEV_EN_V11": "index\tquestion\tanswer\tA\tB\n",
            "MMStar": "index\tquestion\tanswer\tA\tB\n"}
  data = (write_tsv(tmp_path / f"{name}.tsv", rows) if rows else
          str(tmp_path / f"{name}.tsv"))
  if not rows:
    (tmp_path / f"{name}.tsv").write_text(header[name])
  pred = write_tsv(tmp_path / "pred.tsv", [{"index": r["index"], "prediction": "A"}
                                           for r in rows] or [{"index": 0, "prediction": "A"}])
  with pytest.raises(InputError, match=rf"^{re.escape(data)}: {message}"):
    score_files(data, pred)


def test_the_score_command_writes_vlmevalkit_metric_names(tmp_path):
  rows = [{"index": 1, "question": "q", "answer": "B", "A": "x", "B": "y"}]
  data = write_tsv(tmp_path / "AI2D_TEST.tsv", rows)
  pred = write_tsv(tmp_path / "pred.tsv", [dict(rows[0], prediction="B")])
  out = tmp_path / "score.json"
  subprocess.run([sys.executable, "-m", "tokenflex_jax.score", f"--data={data}",
                  f"--predictions={pred}", f"--json_out={out}"], check=True,
                 capture_output=True, text=True)
  assert json.loads(out.read_text()) == {"benchmark": "AI2D_TEST", "Overall": 1.0,
                                         "questions": 1,
                                         "splits": {"none": {"Overall": 1.0}}}
  assert benchmarks.mc_prompt(dict(rows[0], hint="Look.")) == (
      "Hint: Look.\nQuestion: q\nOptions:\nA. x\nB. y\n"
      "Please select the correct answer from the options above. \n")
