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
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from etils import epath

from tokenflex_jax.errors import InputError

T = TypeVar("T")

# config.data.on_bad_record="skip" skips single bad records, not a broken source.
MAX_BAD_IN_A_ROW = 100


def too_many_bad(count: int, what: str, last: Exception | None) -> InputError:
  """The error that stops a "skip" run at ``count`` bad ``what`` (records,
  conversations) in a row, ``last`` the latest."""
  return InputError(f"{count} {what} in a row are bad, e.g. {last}; "
                    "config.data.on_bad_record='skip' skips single bad records, not a "
                    "broken source")


class MalformedRowError(InputError):
  """A data row that cannot be used; the message names the file and the row ("record"
  for ``unit`` in a TFDS build, where ``path`` names the build and split)."""

  def __init__(self, path: str, row: int, reason: str, detail: str = "", unit: str = "row"):
    self.path, self.row, self.reason, self._args = path, row, reason, (detail, unit)
    super().__init__(f"{path}: {unit} {row}: {reason}{': ' + detail if detail else ''}")

  def __reduce__(self):  # Picklable: grain's worker processes send errors back.
    return type(self), (self.path, self.row, self.reason, *self._args)


INVALID_UTF8 = "invalid UTF-8"
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_text(path: str) -> str:
  """A text file's contents. Bytes that are not UTF-8 become lone surrogates (Python's
  "surrogateescape"), which `check_text` then finds in the one row that holds them; a
  leading byte-order mark is dropped. ``path`` may be gs:// (`etils.epath`)."""
  data = epath.Path(path).read_bytes()
  return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def data_lines(text: str) -> list[str]:
  """The non-empty lines of a JSON-lines text, split at newlines only (a JSON string may
  hold U+2028 and the like, where `str.splitlines` would cut it)."""
  return [line for line in text.split("\n") if line.strip()]


def bad_text(value: object, where: str = "") -> str:
  """"" if every string in ``value`` (a decoded JSON value, nested) is valid text, else
  where the first one that is not sits and why: bytes that were not UTF-8 (`read_text`)
  or a lone surrogate escape such as "\\ud800", both unencodable as UTF-8."""
  if isinstance(value, str):
    m = _SURROGATE.search(value)
    if m is None:
      return ""
    code = ord(m.group())
    what = (f"byte 0x{code - 0xdc00:02x} is not UTF-8" if 0xdc80 <= code <= 0xdcff
            else f"lone surrogate U+{code:04X}")
    return f"{where or 'text'} at character {m.start()}: {what}"
  if isinstance(value, dict):
    items = value.items()
  elif isinstance(value, (list, tuple)):
    items = enumerate(value)
  else:
    return ""
  for key, item in items:
    found = bad_text(key, f"{where}[{key!r}] (a key)") or bad_text(item, f"{where}[{key!r}]")
    if found:
      return found
  return ""


def check_text(value: object, path: str, row: int) -> None:
  """`MalformedRowError` "invalid UTF-8" naming the field if `bad_text` finds one."""
  found = bad_text(value)
  if found:
    raise MalformedRowError(path, row, INVALID_UTF8, found)


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
  not JSON (a number too big to convert, too deep a nesting included), "invalid UTF-8"
  if a string in it is not valid text (`check_text`)."""
  try:
    value = json.loads(line)
  except (json.JSONDecodeError, ValueError, RecursionError) as e:
    raise MalformedRowError(path, row, "invalid JSON", str(e)[:200]) from None
  check_text(value, path, row)
  return value


def format_skipped(skipped: dict[str, int]) -> str:
  """{"missing image": 2} -> "2 rows skipped (missing image: 2)"; "" if none."""
  if not skipped:
    return ""
  total = sum(skipped.values())
  return f"{total} rows skipped ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})"
