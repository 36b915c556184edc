"""Answer extraction as VLMEvalKit does it without a judge (``--judge exact_matching``).

Follows VLMEvalKit at commit e8e78f0 (2026-08-18), `vlmeval/utils/matching_util.py`,
`vlmeval/dataset/utils/yorn.py` and `vlmeval/smp/misc.py`, quirks included, so that a
score here is the score VLMEvalKit's rule-based path gives the same predictions
(docs/benchmarks.md lists the rules and their known surprises).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# A prediction naming no option ("refused"): VLMEvalKit's 'Z', scored as wrong.
REFUSED = "Z"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = ".()[],:;!*#{}"
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
  """The option letter a prediction states as a token: the one choice letter (case
  sensitive) among its tokens (split at whitespace and ``.()[],:;!*#{}``), first seen in
  its last 4 tokens; else "answer is X" for X in A-D; `REFUSED` for a known refusal or a
  lone "Z"; None if none."""
  if "Failed to obtain answer via API" in answer:
    return None
  if any(refusal in answer for refusal in _REFUSALS):
    return REFUSED
  spaced = answer
  for c in _SEPARATORS:
    spaced = spaced.replace(c, " ")
  tokens = spaced.split()
  named = [letter for letter in choices if letter in tokens]
  if len(named) == 1:
    if tokens.index(named[0]) > len(tokens) - 5:
      return named[0]
  elif not named and REFUSED in tokens:
    return REFUSED
  m = _ANSWER_IS.search(answer)
  if m and m.group(1).upper() in choices:
    return m.group(1).upper()
  return None


def infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
  """The option whose text is the only one found in the (lower-cased) prediction; None
  for a prediction longer than twice all option texts together."""
  text = answer.lower()
  if len(text) > 2 * sum(len(str(v)) for v in choices.values()):
    return None
  found = [letter for letter, option in choices.items() if str(option).lower() in text]
  return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
  """VLMEvalKit's ``can_infer``: `infer_option`, else `infer_text` (None: neither).
  ``choices``: {letter: option text} in letter order."""
  answer = str(answer)
  return infer_option(answer, choices) or infer_text(answer, choices)


def infer_choice(answer: str, choices: Mapping[str, str]) -> str:
  """`can_infer` with no judge: what it finds, else `REFUSED`."""
  return can_infer(answer, choices) or REFUSED


_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!"]
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str) -> str:
  """The VQA evaluation's punctuation handling (VLMEvalKit `process_punctuation`): each
  mark is deleted where it touches a space (or wherever, if the text has a 1,000-style
  number), else replaced by a space; then up to 32 periods with no digit on either side go."""
  out = text
  for p in _PUNCTUATION:
    if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=32)


def yes_or_no(prediction: str) -> str:
  """"Yes", "No" or "Unknown": whether the prediction's words (lower-cased, punctuation
  processed) hold "yes" or "no" and not both (VLMEvalKit `YOrN_Extraction`)."""
  words = process_punctuation(str(prediction).lower()).split()
  if "yes" in words and "no" not in words:
    return "Yes"
  if "no" in words and "yes" not in words:
    return "No"
  return "Unknown"


HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"


def ocr_match(prediction: str, answers: list[str], category: str) -> bool:
  """OCRBench's rule: some answer is a substring of the prediction, both lower-cased with
  their ends stripped and newlines as spaces; for handwritten math, every space removed
  and case kept."""
  pred = str(prediction)
  for answer in answers:
    if category == HANDWRITTEN_MATH:
      a = answer.strip().replace("\n", " ").replace(" ", "")
      p = pred.strip().replace("\n", " ").replace(" ", "")
    else:
      a = answer.lower().strip().replace("\n", " ")
      p = pred.lower().strip().replace("\n", " ")
    if a in p:
      return True
  return False
