"""Malformed-row errors and the collect-or-skip policy shared by every row-based reader.

A reader (LLaVA JSON in `llava`, MMBench TSV and VQA JSONL in
`tokenflex_jax.evaluation.eval_files`) parses its rows one by one; a row it cannot use
raises `MalformedRowError` naming the file, the row (counted from 0 among the data rows)
and a short reason. `collect_rows` either lets that error stop the read or, with
``skip_malformed``, leaves the row out and counts it by reason; `format_skipped` puts
those counts into one log line.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tokenflex_jax.errors import InputError

T = TypeVar("T")


class MalformedRowError(InputError):
  """A data row that cannot be used; the message names the file and the row."""

  def __init__(self, path: str, row: int, reason: str, detail: str = ""):
    self.path, self.row, self.reason = path, row, reason
    super().__init__(f"{path}: row {row}: {reason}{': ' + detail if detail else ''}")


def collect_rows(rows: Sequence[Any], parse: Callable[[int, Any], T], skip_malformed: bool
                 ) -> tuple[list[T], dict[str, int]]:
  """[parse(row number, row)] for every row; a `MalformedRowError` propagates, or with
  ``skip_malformed`` leaves the row out and is counted: returns (parsed, {reason: rows})."""
  out, skipped = [], collections.Counter()
  for i, row in enumerate(rows):
    try:
      out.append(parse(i, row))
    except MalformedRowError as e:
      if not skip_malformed:
        raise
      skipped[e.reason] += 1
  return out, dict(skipped)


def json_line(line: str, path: str, row: int) -> object:
  """One line of a JSON-lines file, decoded; `MalformedRowError` "invalid JSON" if it is
  not JSON."""
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise MalformedRowError(path, row, "invalid JSON", str(e)) from None


def format_skipped(skipped: dict[str, int]) -> str:
  """{"missing image": 2} -> "2 rows skipped (missing image: 2)"; "" if none."""
  if not skipped:
    return ""
  total = sum(skipped.values())
  return f"{total} rows skipped ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
