"""Property-based fuzzing of every data reader: image decoding, LLaVA JSON, VQA JSONL,
MMBench TSV, the scene suite's and LLaVA's TFDS records, and the pipeline's skip policy.

Bad inputs are made by mutating valid ones (fields dropped or retyped, markers removed or
repeated, bytes flipped, truncated, made invalid UTF-8, images of every mode and size,
corrupt, truncated or too large). Each property: a read either succeeds with a
well-formed result (shapes, dtypes, value ranges, one image marker) or raises
`InputError` naming the file (or TFDS build) and the row (or record); with skipping it
never raises and read + skipped == the rows. Where the mutation says whether a row is
bad, the first bad row is the one the error names. Generation is derandomized (fixed).
"""

import base64
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.test_real_formats import make_hf_tokenizer
from tokenflex_jax.data import chat, images, llava, llava_tfds, pipeline, scenes, tfds_builder
from tokenflex_jax.data.conversation import IMAGE_MARKER
from tokenflex_jax.data.rows import MalformedRowError
from tokenflex_jax.errors import ConfigError, InputError
from tokenflex_jax.evaluation import eval_files


def fuzz(n: int):
  """A fixed-seed hypothesis run of ``n`` examples."""
  return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])


SIZE = 16           # the decode size of the readers
IMAGE_TOKEN = "<|image_pad|>"
INVALID_UTF8 = (b"\xff", b"\xc3", b"\x80abc", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")
SENTINEL = "QQBADQQ"  # replaced by invalid UTF-8 bytes once the text is encoded
REASONS = {images.UNREADABLE, images.TOO_LARGE, images.UNSUPPORTED_MODE}


# --- Images --------------------------------------------------------------------------

# mode -> the formats that can store it.
IMAGE_FORMATS = {
    "RGB": ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"), "L": ("PNG", "JPEG", "BMP", "TIFF"),
    "1": ("PNG", "BMP", "TIFF"), "P": ("PNG", "BMP", "GIF", "TIFF"), "PT": ("PNG", "GIF"),
    "RGBA": ("PNG", "TIFF", "WEBP"), "LA": ("PNG", "TIFF"), "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",), "I32": ("TIFF",), "F": ("TIFF",), "CMYK": ("JPEG", "TIFF"),
}
LOSSLESS = ("PNG", "BMP", "TIFF")


def make_image(mode: str, w: int, h: int, seed: int) -> tuple[Image.Image, np.ndarray]:
  """(a PIL image of ``mode`` ("PT": palette with a transparent entry, "I32": 32-bit
  integers beyond 16 bits), its pixels as the array it was made from)."""
  rng = np.random.default_rng(seed)
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  if mode == "RGB":
    return Image.fromarray(rgb), rgb
  if mode == "L":
    return Image.fromarray(rgb[..., 0]), rgb[..., 0]
  if mode == "1":
    bits = rgb[..., 0] > 127
    return Image.fromarray(bits), bits
  if mode in ("P", "PT"):
    im = Image.fromarray(rgb).quantize(colors=8)
    if mode == "PT":
      im.info["transparency"] = 0
    return im, np.asarray(im)
  if mode == "RGBA":
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(rgba), rgba
  if mode == "LA":
    return Image.merge("LA", (Image.fromarray(rgb[..., 0]), Image.fromarray(rgb[..., 1]))), rgb
  if mode == "I;16":
    a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    return Image.fromarray(a), a
  if mode in ("I", "I32"):
    top = 65536 if mode == "I" else 1 << 30
    a = rng.integers(0 if mode == "I" else 70000, top, (h, w)).astype(np.int32)
    return Image.fromarray(a), a
  if mode == "F":
    a = rng.random((h, w)).astype(np.float32)
    return Image.fromarray(a), a
  if mode == "CMYK":
    return Image.fromarray(rgb).convert("CMYK"), rgb
  raise ValueError(mode)


def encode(im: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


def png(color=(200, 30, 30), w: int = 8, h: int = 8, mode: str = "RGB") -> bytes:
  return encode(Image.new(mode, (w, h), color if mode == "RGB" else color[0]), "PNG")


def huge_png(w: int, h: int) -> bytes:
  """A PNG whose header says w x h (checksum fixed) over a tiny image's data."""
  data = bytearray(png(w=4, h=4))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", w, h)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  return bytes(data)


@st.composite
def image_case(draw):
  """(bytes, mode, format, (w, h), source pixels, mutation)."""
  mode = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
  fmt = draw(st.sampled_from(IMAGE_FORMATS[mode]))
  w = draw(st.sampled_from([1, 2, 3, 8, 16, 31, 32]))
  h = draw(st.sampled_from([w, 1, 5, 16, 32]))
  im, pixels = make_image(mode, w, h, draw(st.integers(0, 2**16)))
  data = encode(im, fmt)
  mutation = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "insert", "prefix",
                                                  "empty", "huge", "text"]))
  if mutation == "truncate":
    data = data[:draw(st.integers(0, len(data) - 1))]
  elif mutation == "flip":
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
      data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    data = bytes(data)
  elif mutation == "insert":
    at = draw(st.integers(0, len(data)))
    data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
  elif mutation == "prefix":
    data = draw(st.binary(min_size=1, max_size=8)) + data
  elif mutation == "empty":
    data = b""
  elif mutation == "huge":
    big = draw(st.sampled_from([(8193, 8193), (100_000, 1000), (1, images.MAX_PIXELS + 1),
                                (65_535, 65_535)]))
    data, fmt, mode = huge_png(*big), "PNG", "RGB"
    w, h = big
  elif mutation == "text":
    data = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
  return data, mode, fmt, (w, h), pixels, mutation


@fuzz(600)
@given(image_case(), st.sampled_from([None, 1, 8, SIZE, 32]))
def test_image_decoding(case, size):
  data, mode, fmt, (w, h), pixels, mutation = case
  try:
    out = images.decode(data, size)
  except images.ImageError as e:
    event(f"{mutation}: {e.reason}")
    assert e.reason in REASONS, e
    if mutation == "none":  # A valid image fails only for a mode without a range.
      assert mode in ("F", "I32") and e.reason == images.UNSUPPORTED_MODE, e
    if mutation == "huge":
      assert e.reason == images.TOO_LARGE and str(w * h) in str(e)
    return
  event(f"{mutation}: decoded")
  assert mutation != "huge" and not (mutation == "none" and mode in ("F", "I32"))
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
  assert out.shape[:2] == ((size, size) if size else out.shape[:2])
  if mutation != "none" or size is not None or fmt not in LOSSLESS:
    return
  # Unmutated, at its own size, losslessly stored: the pixels are the image's.
  assert out.shape[:2] == (h, w)
  if mode == "RGB":
    np.testing.assert_array_equal(out, pixels)
  elif mode in ("L", "1", "I;16", "I"):
    gray = {"L": lambda p: p, "1": lambda p: np.where(p, 255, 0),
            "I;16": lambda p: (p.astype(np.int64) * 255 + 32767) // 65535}.get(
                mode, lambda p: (p.astype(np.int64) * 255 + 32767) // 65535)(pixels)
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], gray)
  elif mode == "RGBA":
    alpha = pixels[..., 3:].astype(np.float64) / 255
    want = pixels[..., :3] * alpha + 255 * (1 - alpha)  # over white
    assert np.abs(out.astype(np.float64) - want).max() <= 1.5


def test_decompression_bomb_and_modes_named():
  with pytest.raises(images.ImageError, match=r"10000000000 pixels.*bomb"):
    images.decode(huge_png(100_000, 100_000), SIZE)
  with pytest.raises(images.ImageError, match=r"9000x9000 = 81000000 pixels.*bomb"):
    images.decode(huge_png(9000, 9000), SIZE)
  transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
  assert (images.decode(encode(transparent, "PNG"), 4) == 255).all()  # white, not black
  with pytest.raises(images.ImageError, match="mode F"):
    images.decode(encode(Image.new("F", (4, 4)), "TIFF"), 4)
  assert images.decode(png(w=1, h=1), SIZE).shape == (SIZE, SIZE, 3)


# --- Row files: shared helpers ---------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=12)


def clean_text(draw, prefix: str) -> str:
  """A non-empty text without markers, tabs, newlines or quotes (so a TSV field stays one
  field) but with any other unicode (U+2028 included)."""
  text = draw(TEXT.filter(lambda t: IMAGE_MARKER not in t and "nan" not in t.lower()))
  return f"{prefix} {text}".replace('"', "'")


def encode_file(text: str, rng_bytes: list[bytes]) -> bytes:
  """UTF-8 bytes of ``text`` (lone surrogates kept as their invalid 3-byte forms), each
  SENTINEL replaced by the next of ``rng_bytes``."""
  data = text.encode("utf-8", "surrogatepass")
  for bad in rng_bytes:
    data = data.replace(SENTINEL.encode(), bad, 1)
  return data


def check_error(e: InputError, path: str, total: int, unit: str = "row") -> int:
  """The error names the file and a row in range; returns the row."""
  message = str(e)
  assert os.path.basename(path) in message, message
  m = re.search(rf"\b{unit} (\d+)", message)
  assert m, message
  row = int(m.group(1))
  assert 0 <= row < max(total, 1), message
  if isinstance(e, MalformedRowError):
    assert e.row == row and e.reason
  return row


# --- LLaVA JSON ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """An image folder: valid images of several modes and sizes, and broken ones."""
  root = tmp_path_factory.mktemp("fuzz")
  files = {"ok.png": png(), "gray.png": png(mode="L"), "tiny.png": png(w=1, h=1),
           "wide.png": png(w=32, h=3), "rgba.png": encode(make_image("RGBA", 8, 8, 0)[0], "PNG"),
           "p16.png": encode(make_image("I;16", 8, 8, 1)[0], "PNG"),
           "pal.gif": encode(make_image("PT", 8, 8, 2)[0], "GIF"),
           "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "trunc.png": png(w=16, h=16)[:60],
           "bomb.png": huge_png(20_000, 20_000), "empty.png": b""}
  for name, data in files.items():
    (root / name).write_bytes(data)
  (root / "sub").mkdir()
  return root


GOOD_IMAGES = ("ok.png", "gray.png", "tiny.png", "wide.png", "rgba.png", "p16.png", "pal.gif")
BAD_IMAGES = ("corrupt.png", "trunc.png", "bomb.png", "empty.png")

LLAVA_MUTATIONS = {
    "good": ["none", "none", "none", "long_text", "drop_id", "int_id", "marker_later",
             "line_separator", "extra_field", "ascii_escapes"],
    "bad": ["mistyped_id", "drop_image", "image_type", "image_missing", "drop_conversations",
            "conversations_type", "no_marker", "two_markers", "marker_in_reply", "empty_reply",
            "reply_type", "question_type", "drop_last_reply", "drop_first_turn",
            "unknown_role", "turn_type", "row_type", "invalid_utf8", "lone_surrogate"],
    "structural": ["truncate"],
}


@st.composite
def llava_row(draw, i: int, lines: bool):
  """(row as JSON text, "good" | "bad" | "structural", mutation)."""
  rounds = draw(st.integers(1, 3))
  turns = []
  for r in range(rounds):
    q = clean_text(draw, f"question {i}.{r}?")
    if r == 0:
      q = f"{IMAGE_MARKER}\n{q}" if draw(st.booleans()) else f"{q} {IMAGE_MARKER}"
    turns += [{"from": draw(st.sampled_from(["human", "user"])), "value": q},
              {"from": draw(st.sampled_from(["gpt", "assistant"])),
               "value": clean_text(draw, f"answer {i}.{r}")}]
  row = {"id": f"r{i}", "image": draw(st.sampled_from(GOOD_IMAGES)), "conversations": turns}
  kind = draw(st.sampled_from(["good"] * 3 + ["bad"] * 3 + ["structural"]))
  mutation = draw(st.sampled_from(LLAVA_MUTATIONS[kind]))
  ascii_only = draw(st.booleans())
  if mutation == "long_text":
    turns[-1]["value"] += " long" * draw(st.integers(100, 3000))
  elif mutation == "drop_id":
    del row["id"]
  elif mutation == "int_id":
    row["id"] = draw(st.integers(-5, 10**12))
  elif mutation == "marker_later":
    if rounds > 1:
      turns[0]["value"] = turns[0]["value"].replace(IMAGE_MARKER, "")
      turns[2]["value"] += IMAGE_MARKER
  elif mutation == "line_separator":
    turns[1]["value"] += "\u2028\u2029\x85 and more"
  elif mutation == "extra_field":
    row["extra"] = [1, {"a": None}, "\u00e9"]
  elif mutation == "ascii_escapes":
    ascii_only = True
    turns[1]["value"] += " caf\u00e9 \U0001F600"
  elif mutation == "mistyped_id":
    row["id"] = draw(st.sampled_from([None, 1.5, [1], {"a": 1}, True]))
  elif mutation == "drop_image":
    del row["image"]
  elif mutation == "image_type":
    row["image"] = draw(st.sampled_from([None, "", 0, 5, [5], ["ok.png", ""], {"p": 1}]))
  elif mutation == "image_missing":
    row["image"] = draw(st.sampled_from(["nope.png", "sub", "sub/ok.png", "ok.png\x00"]))
  elif mutation == "drop_conversations":
    del row["conversations"]
  elif mutation == "conversations_type":
    row["conversations"] = draw(st.sampled_from([[], "text", {"from": "human"}, 3, None]))
  elif mutation == "no_marker":
    turns[0]["value"] = turns[0]["value"].replace(IMAGE_MARKER, "")
  elif mutation == "two_markers":
    at = draw(st.sampled_from([0] + [2 * r for r in range(1, rounds)]))
    turns[at]["value"] += IMAGE_MARKER
  elif mutation == "marker_in_reply":
    turns[2 * draw(st.integers(0, rounds - 1)) + 1]["value"] += IMAGE_MARKER
  elif mutation == "empty_reply":
    turns[2 * draw(st.integers(0, rounds - 1)) + 1]["value"] = draw(st.sampled_from(["", "  ",
                                                                                    "\n"]))
  elif mutation == "reply_type":
    turns[2 * draw(st.integers(0, rounds - 1)) + 1]["value"] = draw(
        st.sampled_from([None, 3, ["a"], {"a": 1}]))
  elif mutation == "question_type":
    turns[0]["value"] = draw(st.sampled_from([None, 3, [IMAGE_MARKER]]))
  elif mutation == "drop_last_reply":
    turns.pop()
  elif mutation == "drop_first_turn":
    turns.pop(0)
  elif mutation == "unknown_role":
    turn = turns[draw(st.integers(0, len(turns) - 1))]
    value = draw(st.sampled_from(["system", "", "Human", 3, None, ["human"], "drop"]))
    if value == "drop":
      del turn["from"]
    else:
      turn["from"] = value
  elif mutation == "turn_type":
    turns[draw(st.integers(0, len(turns) - 1))] = draw(st.sampled_from(["human", 3, None, []]))
  elif mutation == "row_type":
    row = draw(st.sampled_from([3, "row", None] + ([] if lines else [[1, 2], []])))
  elif mutation == "invalid_utf8":
    where = draw(st.sampled_from(["id", "image", "question", "reply", "key"]))
    if where in ("id", "image"):
      row[where] += SENTINEL
    elif where == "key":
      row[f"note{SENTINEL}"] = 1
    else:
      turns[0 if where == "question" else 1]["value"] += SENTINEL
  elif mutation == "lone_surrogate":
    turns[1]["value"] += draw(st.sampled_from(["\ud800", "\udfff", "\udc80x"]))
  text = json.dumps(row, ensure_ascii=ascii_only)
  if mutation == "truncate":
    text = text[:draw(st.integers(1, len(text) - 1))]
  return text, kind, mutation


@st.composite
def llava_file(draw):
  lines = draw(st.booleans())
  n = draw(st.integers(1, 6))
  rows = [draw(llava_row(i, lines)) for i in range(n)]
  bad_bytes = [draw(st.sampled_from(INVALID_UTF8)) for _ in rows]
  start = draw(st.sampled_from(["", "\ufeff", " \n"]))
  if lines:
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n", "\n \n"]))
    text = start + sep.join(r[0] for r in rows) + draw(st.sampled_from(["", "\n"]))
  else:
    text = start + "[" + ",\n ".join(r[0] for r in rows) + "]\n"
  return encode_file(text, bad_bytes), lines, [(kind, m) for _, kind, m in rows]


def check_conversation(c: llava.Conversation) -> None:
  """Invariants of a row read: alternating roles from the user, a reply last, non-empty
  replies, exactly one marker in a user turn, valid text, an existing image."""
  assert c.turns and len(c.turns) % 2 == 0
  for k, (role, text) in enumerate(c.turns):
    assert role == ("user" if k % 2 == 0 else "assistant") and isinstance(text, str)
    text.encode("utf-8")  # valid text: no lone surrogates
    if role == "assistant":
      assert text.strip() and IMAGE_MARKER not in text
  assert sum(text.count(IMAGE_MARKER) for _, text in c.turns) == 1
  assert len(c.image_paths) == 1 and os.path.isfile(c.image_paths[0])
  assert isinstance(c.id, str)


@fuzz(500)
@given(llava_file())
def test_llava_json(folder, case):
  data, lines, kinds = case
  path = str(folder / ("rows.jsonl" if lines else "rows.json"))
  with open(path, "wb") as f:
    f.write(data)
  n = len(kinds)
  bad = [k for k, (kind, _) in enumerate(kinds) if kind != "good"]
  structural = [k for k, (kind, _) in enumerate(kinds) if kind == "structural"]
  exact = lines or not structural  # a broken JSON list may swallow its next rows
  for skip in (False, True):
    try:
      rows, skipped = llava.read_llava(path, str(folder), skip_malformed=skip)
      event(f"skip={skip}: read {'all' if not skipped else 'some'}")
    except InputError as e:
      event(f"skip={skip}: {getattr(e, 'reason', '')}")
      row = check_error(e, path, n)
      assert isinstance(e, MalformedRowError)
      if exact:
        assert not skip and bad and row == bad[0], (kinds, e)
      else:  # Skipping never raises, but at a break in a JSON list's structure.
        assert not skip or e.reason == "invalid JSON", (kinds, e)
      continue
    for c in rows:
      check_conversation(c)
    assert len(rows) + sum(skipped.values()) <= n and (skip or not skipped)
    if exact:
      assert [c.row for c in rows] == [k for k in range(n) if k not in bad], (kinds, skipped)
      assert len(rows) + sum(skipped.values()) == n and (skip or not bad)


# --- VQA JSONL -------------------------------------------------------------------------

VQA_MUTATIONS = {
    "good": ["none", "none", "answer_str", "answer_dicts", "category", "good_image",
             "long_question", "absolute_image", "line_separator", "no_category"],
    "bad": ["question", "answers", "image_field", "bad_image", "category_type", "row_type",
            "invalid_utf8", "lone_surrogate", "truncate"],
}


@st.composite
def vqa_row(draw, i: int, folder_path: str):
  row = {"image": "ok.png", "question": clean_text(draw, f"what is {i}?"),
         "answers": [clean_text(draw, "a") for _ in range(draw(st.integers(1, 10)))],
         "category": "c"}
  kind = draw(st.sampled_from(["good", "bad"]))
  mutation = draw(st.sampled_from(VQA_MUTATIONS[kind]))
  if mutation == "answer_str":
    row["answers"] = "yes"
  elif mutation == "answer_dicts":
    row["answers"] = [{"answer": a} for a in row["answers"]]
  elif mutation == "category":
    row["category"] = draw(st.sampled_from(["", "x y", 3]))
  elif mutation == "no_category":
    del row["category"]
  elif mutation == "good_image":
    row["image"] = draw(st.sampled_from(GOOD_IMAGES))
  elif mutation == "long_question":
    row["question"] += " very" * draw(st.integers(100, 3000))
  elif mutation == "absolute_image":
    row["image"] = os.path.join(folder_path, "gray.png")
  elif mutation == "line_separator":
    row["question"] += "\u2028 next"
  elif mutation == "question":
    value = draw(st.sampled_from(["", "   ", None, 3, ["q"], "drop"]))
    if value == "drop":
      del row["question"]
    else:
      row["question"] = value
  elif mutation == "answers":
    value = draw(st.sampled_from([[], None, 5, {"a": 1}, [""], [3], [{"answer": 3}],
                                  [{"x": "a"}], ["ok", " "], "", "drop"]))
    if value == "drop":
      del row["answers"]
    else:
      row["answers"] = value
  elif mutation == "image_field":
    value = draw(st.sampled_from(["", None, 3, "nope.png", "sub", ["ok.png"], "drop"]))
    if value == "drop":
      del row["image"]
    else:
      row["image"] = value
  elif mutation == "bad_image":
    row["image"] = draw(st.sampled_from(BAD_IMAGES))
  elif mutation == "category_type":
    row["category"] = draw(st.sampled_from([["c"], {"c": 1}, 1.5]))
  elif mutation == "row_type":
    row = draw(st.sampled_from([3, "row", None]))
  elif mutation == "invalid_utf8":
    key = draw(st.sampled_from(["question", "image", "category"]))
    row[key] += SENTINEL
  elif mutation == "lone_surrogate":
    row["question"] += "\udbff"
  text = json.dumps(row, ensure_ascii=draw(st.booleans()))
  if mutation == "truncate":
    text = text[:draw(st.integers(1, len(text) - 1))]
  return text, kind, mutation


def check_vqa(pixels, question, answers, category) -> None:
  assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
  assert isinstance(question, str) and question and question == question.strip()
  assert answers and all(isinstance(a, str) and a.strip() for a in answers)
  assert isinstance(category, str) and category


@fuzz(500)
@given(st.data())
def test_vqa_jsonl(folder, data):
  n = data.draw(st.integers(1, 6))
  rows = [data.draw(vqa_row(i, str(folder))) for i in range(n)]
  sep = data.draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
  raw = encode_file(sep.join(r[0] for r in rows) + "\n",
                    [data.draw(st.sampled_from(INVALID_UTF8)) for _ in rows])
  path = str(folder / "vqa.jsonl")
  with open(path, "wb") as f:
    f.write(raw)
  bad = [k for k, r in enumerate(rows) if r[1] == "bad"]
  for skip in (False, True):
    try:
      read, skipped = eval_files.read_vqa(path, SIZE, skip_malformed=skip)
      event(f"skip={skip}: read {'all' if not skipped else 'some'}")
    except InputError as e:
      event(f"skip={skip}: {getattr(e, 'reason', '')}")
      assert not skip and bad and check_error(e, path, n) == bad[0], ([r[2] for r in rows], e)
      continue
    for r in read:
      check_vqa(*r)
    assert len(read) == n - len(bad) and len(read) + sum(skipped.values()) == n
    assert skip or not bad


# --- MMBench TSV -----------------------------------------------------------------------

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
MMBENCH_MUTATIONS = {
    "good": ["none", "none", "none", "empty_index", "text_index", "long_question", "hint",
             "line_separator", "trailing_empty_field", "good_image"],
    "bad": ["empty_question", "answer", "gap", "one_option", "empty_image", "not_base64",
            "bad_image", "missing_reference", "invalid_utf8", "fewer_fields", "extra_field"],
    "excluded": ["circular_copy"],
    "structural": ["tab", "newline", "quote", "nul"],
}
B64_IMAGES = {name: base64.b64encode(data).decode() for name, data in {
    "ok": png(), "gray": png(mode="L"), "tiny": png(w=1, h=1), "wide": png(w=32, h=3),
    "rgba": encode(make_image("RGBA", 8, 8, 0)[0], "PNG"),
    "p16": encode(make_image("I;16", 8, 8, 1)[0], "PNG"),
    "jpeg": encode(make_image("CMYK", 8, 8, 2)[0], "JPEG"),
    "corrupt": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "trunc": png(w=16, h=16)[:60],
    "bomb": huge_png(20_000, 20_000)}.items()}


@st.composite
def mmbench_row(draw, i: int, mutable: bool, refs: bool):
  k = draw(st.integers(2, 4))
  options = [clean_text(draw, f"opt{j}") for j in range(k)]
  blank = draw(st.sampled_from(["nan", ""]))
  fields = {"index": str(100 + i), "question": clean_text(draw, "Which?"),
            "hint": draw(st.sampled_from(["nan", "", "a hint"])),
            **{letter: (options[j] if j < k else blank) for j, letter in enumerate("ABCD")},
            "answer": "ABCD"[draw(st.integers(0, k - 1))], "category": clean_text(draw, "cat"),
            "image": "100" if refs and i > 0 and draw(st.booleans()) else B64_IMAGES["ok"]}
  kind = draw(st.sampled_from(["good", "good", "bad", "bad", "excluded", "structural"])
              if mutable else st.just("good"))
  mutation = draw(st.sampled_from(MMBENCH_MUTATIONS[kind])) if mutable else "none"
  extra = []
  if mutation == "empty_index":
    fields["index"] = ""
  elif mutation == "text_index":
    fields["index"] = draw(st.sampled_from(["x7", "1e6", "-3", "\u0663", "\u00b2"]))
  elif mutation == "long_question":
    fields["question"] += " long" * draw(st.integers(100, 3000))
  elif mutation == "hint":
    fields["hint"] = clean_text(draw, "hint")
  elif mutation == "line_separator":
    fields["question"] += "\u2028\x0b\x0c\x1c\x85 more"
  elif mutation == "trailing_empty_field":
    extra = [""]
  elif mutation == "good_image":
    fields["image"] = B64_IMAGES[draw(st.sampled_from(["gray", "tiny", "wide", "rgba", "p16",
                                                        "jpeg"]))]
  elif mutation == "empty_question":
    fields["question"] = draw(st.sampled_from(["", "  "]))
  elif mutation == "answer":
    fields["answer"] = draw(st.sampled_from(["", "E", "a", "AB", "ABCD"[k:] or "Z", "nan"]))
  elif mutation == "gap":
    fields["ABCD"[draw(st.integers(0, k - 2))]] = draw(st.sampled_from(["", "nan", " "]))
  elif mutation == "one_option":
    fields.update(B=blank, C=blank, D=blank, answer="A")
  elif mutation == "empty_image":
    fields["image"] = ""
  elif mutation == "not_base64":
    fields["image"] = draw(st.sampled_from(["@@@", "abc", "\u00e9t\u00e9", B64_IMAGES["ok"][:-3]]))
  elif mutation == "bad_image":
    fields["image"] = B64_IMAGES[draw(st.sampled_from(["corrupt", "trunc", "bomb"]))]
  elif mutation == "missing_reference":
    fields["image"] = "999"
  elif mutation == "invalid_utf8":
    key = draw(st.sampled_from(HEADER))
    fields[key] += SENTINEL
  elif mutation == "circular_copy":
    fields["index"] = str(1_000_000 + i)
  index = fields["index"]
  line = [fields[c] for c in HEADER] + extra
  if mutation == "fewer_fields":
    line = line[:draw(st.integers(1, len(HEADER) - 1))]
  elif mutation == "extra_field":
    line.append(draw(st.sampled_from(["x", "nan", "A"])))
  text = "\t".join(line)
  if kind == "structural":
    at = draw(st.integers(0, len(text)))
    insert = {"tab": "\t", "newline": "\n", "quote": '"', "nul": "\x00"}[mutation]
    text = text[:at] + insert + text[at:]
  return text, kind, mutation, index


def check_question(q: eval_files.ChoiceQuestion) -> None:
  assert len(q.options) >= 2 and all(o and o == o.strip() for o in q.options)
  assert 0 <= q.answer < len(q.options)
  assert q.question and q.question == q.question.strip() and q.category
  assert q.image.shape == (SIZE, SIZE, 3) and q.image.dtype == np.uint8
  for text in (q.question, q.hint, q.category, *q.options):
    text.encode("utf-8")


@fuzz(500)
@given(st.data())
def test_mmbench_tsv(folder, data):
  n = data.draw(st.integers(1, 6))
  refs = data.draw(st.booleans())  # rows may refer to row 0's image: row 0 stays valid
  rows = [data.draw(mmbench_row(i, not (refs and i == 0), refs)) for i in range(n)]
  newline = data.draw(st.sampled_from(["\n", "\r\n"]))
  text = (data.draw(st.sampled_from(["", "\ufeff"])) + "\t".join(HEADER) + newline
          + newline.join(r[0] for r in rows) + data.draw(st.sampled_from(["", newline])))
  raw = encode_file(text, [data.draw(st.sampled_from(INVALID_UTF8)) for _ in rows])
  path = str(folder / "bench.tsv")
  with open(path, "wb") as f:
    f.write(raw)
  kinds = [r[1] for r in rows]
  exact = "structural" not in kinds  # a tab, newline or quote may move fields or rows
  bad = [k for k, kind in enumerate(kinds) if kind == "bad"]
  read_rows = [k for k, kind in enumerate(kinds) if kind == "good"]
  for skip in (False, True):
    try:
      questions, skipped = eval_files.read_mmbench(path, SIZE, skip_malformed=skip)
      event(f"skip={skip}: read {'all' if not skipped else 'some'}")
    except InputError as e:
      event(f"skip={skip}: {getattr(e, 'reason', '')}")
      row = check_error(e, path, n + 8)
      assert not skip, e  # Skipping never raises.
      if exact:
        assert bad and row == bad[0], ([r[2] for r in rows], e)
      continue
    for q in questions:
      check_question(q)
    if exact:
      assert [q.index for q in questions] == [rows[k][3] or str(k) for k in read_rows], (
          [r[2] for r in rows], skipped)
      assert len(questions) + sum(skipped.values()) == n - kinds.count("excluded")
      assert skip or not bad


@fuzz(60)
@given(st.sampled_from(["drop_column", "invalid_utf8", "empty", "header_only", "nul"]),
       st.sampled_from(["question", "answer", "image", "A", "B"]))
def test_mmbench_header(folder, mutation, column):
  header = list(HEADER)
  if mutation == "drop_column":
    header.remove(column)
  elif mutation == "invalid_utf8":
    header[header.index(column)] += SENTINEL
  text = "" if mutation == "empty" else "\t".join(header) + "\n"
  if mutation == "nul":
    text = text.replace(column, column + "\x00", 1)
  path = str(folder / "header.tsv")
  with open(path, "wb") as f:
    f.write(encode_file(text, [b"\xff"]))
  if mutation == "header_only":
    assert eval_files.read_mmbench(path, SIZE) == ([], {})
    return
  with pytest.raises(InputError, match=r"header\.tsv: line 1 \(the header\)"):
    eval_files.read_mmbench(path, SIZE, skip_malformed=True)


# --- TFDS records: the scene suite ------------------------------------------------------

@pytest.fixture(scope="module")
def scene_source(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("scenes_tfds"))
  tfds_builder.build_tfds(d, seed=3, num_train=6, num_validation=2)
  return tfds_builder.tfds_source(d, "train")


def raw_records(source) -> list[bytes]:
  store = source._open()  # pylint: disable=protected-access
  return [store[i] for i in range(len(source))]


def check_scene(ex, size: int = scenes.BASE_SIZE) -> None:
  assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
  for key, top in (("color_map", len(scenes.COLORS)), ("object_map", scenes.NUM_OBJECT_TYPES)):
    assert ex[key].shape == (size, size) and ex[key].dtype == np.int32
    assert ex[key].min() >= 0 and ex[key].max() < top
  family = scenes.get_family(ex["family"])
  assert ex["question"] in family.questions and ex["answer"] in family.answers
  assert isinstance(ex["index"], int)


SCENE_IMAGES = {
    "gray": png(mode="L", w=32, h=32), "rgba": encode(Image.new("RGBA", (32, 32)), "PNG"),
    "small": png(w=16, h=16), "palette": encode(make_image("P", 32, 32, 0)[0], "PNG"),
    "corrupt": b"\x89PNG\r\n\x1a\n" + b"\x01" * 30, "bomb": huge_png(10_000, 10_000),
    "empty": b""}


@st.composite
def scene_record(draw, source, records):
  """(record bytes, "good" | "bad" | "unknown" | the pixels it must have if it decodes)."""
  i = draw(st.integers(0, len(records) - 1))
  features = source._features  # pylint: disable=protected-access
  raw = dict(features.deserialize_example_np(records[i], decoders=source.decoders))
  mutation = draw(st.sampled_from(["none", "image", "text", "labels", "flip", "truncate",
                                   "insert"]))
  kind = "good"
  if mutation == "image":
    name = draw(st.sampled_from(sorted(SCENE_IMAGES) + ["jpeg", "trunc"]))
    if name == "jpeg":  # lossy but RGB of the right size: readable
      raw["image"] = encode(Image.open(io.BytesIO(raw["image"])), "JPEG")
    elif name == "trunc":  # an error, or (only checksums and trailer cut) the same pixels
      original = np.asarray(Image.open(io.BytesIO(raw["image"])))
      raw["image"] = raw["image"][:draw(st.integers(0, len(raw["image"]) - 1))]
      kind = original
    else:
      raw["image"], kind = SCENE_IMAGES[name], "bad"
  elif mutation == "text":
    key = draw(st.sampled_from(["question", "answer", "family"]))
    value = draw(st.sampled_from(["utf8", "empty", "other"]))
    if value == "utf8":
      raw[key], kind = raw[key] + draw(st.sampled_from(INVALID_UTF8)), "bad"
    elif value == "empty":
      raw[key], kind = b"", "bad"
    else:
      raw[key] = draw(st.sampled_from(scenes.corpus_texts() + list(scenes.FAMILY_NAMES)))
      texts = {k: raw[k].decode() if isinstance(raw[k], bytes) else raw[k]
               for k in ("question", "answer", "family")}
      family = {f.name: f for f in scenes.FAMILIES}.get(texts["family"])
      kind = "good" if (family and texts["question"] in family.questions
                        and texts["answer"] in family.answers) else "bad"
  elif mutation == "labels":
    key = draw(st.sampled_from(["color_map", "object_map"]))
    labels = np.array(raw[key])
    labels[draw(st.integers(0, 31)), draw(st.integers(0, 31))] = draw(
        st.sampled_from([-1, 8, 99, 2**31 - 1, 0, 3]))
    top = len(scenes.COLORS) if key == "color_map" else scenes.NUM_OBJECT_TYPES
    kind = "good" if 0 <= labels.min() and labels.max() < top else "bad"
    raw[key] = labels
  record = features.serialize_example(raw)
  if mutation in ("flip", "truncate", "insert"):
    kind, record = "unknown", bytearray(record)
    if mutation == "flip":
      for _ in range(draw(st.integers(1, 3))):
        record[draw(st.integers(0, len(record) - 1))] ^= draw(st.integers(1, 255))
    elif mutation == "truncate":
      record = record[:draw(st.integers(0, len(record) - 1))]
    else:
      at = draw(st.integers(0, len(record)))
      record[at:at] = draw(st.binary(min_size=1, max_size=8))
    record = bytes(record)
  return record, kind


@fuzz(500)
@given(st.data())
def test_scene_tfds_records(scene_source, data):
  records = raw_records(scene_source)
  record, kind = data.draw(scene_record(scene_source, records))
  index = data.draw(st.integers(0, 10**6))
  try:
    ex = scene_source.decode(record, index)
    event("decoded")
  except InputError as e:
    event(e.reason)
    assert isinstance(kind, np.ndarray) or kind != "good", e
    assert isinstance(e, MalformedRowError) and e.row == index
    assert scene_source.name in str(e) and f"record {index}:" in str(e)
    return
  check_scene(ex)
  if isinstance(kind, np.ndarray):
    np.testing.assert_array_equal(ex["image"], kind)  # never decoded in part
  else:
    assert kind != "bad"


# --- TFDS records: LLaVA conversations --------------------------------------------------

@pytest.fixture(scope="module")
def llava_build(tmp_path_factory):
  """(source, tokenizer) of a 3-row LLaVA build; row 2's long reply is 'too long' at
  `LLAVA_LENGTH` tokens."""
  root = tmp_path_factory.mktemp("llava_tfds")
  (root / "a.png").write_bytes(png(w=20, h=12))
  (root / "b.png").write_bytes(encode(make_image("RGBA", 8, 8, 3)[0], "PNG"))
  rows = [{"id": f"q{i}", "image": "ab"[i % 2] + ".png", "conversations": [
      {"from": "human", "value": "<image>\nWhat colour is the picture?"},
      {"from": "gpt", "value": "red" if i < 2 else "long " * 200}]} for i in range(3)]
  (root / "train.json").write_text(json.dumps(rows))
  build = llava_tfds.build(str(root / "tfds"), str(root / "train.json"), str(root))
  tok_path = make_hf_tokenizer(str(root / "tokenizer"))
  tok = chat.load_tokenizer(kind="hf", path=tok_path, template="chatml", image_token=IMAGE_TOKEN)
  return llava_tfds.LlavaTfdsSource(build), tok


LLAVA_LENGTH = 160
CONVERSATIONS = {  # stored conversation JSON -> is it good
    '[["user", "<image>\\nQ?"], ["assistant", "A"]]': True,
    '[["user", "Q? <image>"], ["assistant", "A"], ["user", "more?"], ["assistant", "B"]]': True,
    '[["human", "<image>Q"], ["gpt", "A"]]': True,
    '[["user", "no marker"], ["assistant", "A"]]': False,
    '[["user", "<image><image>"], ["assistant", "A"]]': False,
    '[["assistant", "A"], ["user", "<image>"]]': False,
    '[["user", "<image>"], ["assistant", "  "]]': False,
    '[["user", "<image>"], ["assistant", "A <image>"]]': False,
    '[["user", "<image>"]]': False, '[]': False, '{"a": 1}': False, '[["user"]]': False,
    '[[1, 2]]': False, '[["user", "<image>"], ["assistant", 3]]': False, '"text"': False,
    '[["user", "<image>"], ["assistant", "\\ud800"]]': False,
    '[["user", "<image>"], ["assistant", "A"': False, '': False, 'nan': False,
    '[["user", "<image> <|image_pad|>"], ["assistant", "A"]]': False,  # the token itself
    '[["user", "<image>"], ["assistant", "' + "long " * 100 + '"]]': False,  # too long
}
LLAVA_IMAGES = {"gray": True, "tiny": True, "wide": True, "rgba": True, "p16": True,
                "jpeg": True, "corrupt": False, "trunc": False, "bomb": False, "empty": False}


@st.composite
def llava_record(draw, source, records):
  """(record bytes, "good" | "bad" | "unknown")."""
  i = draw(st.integers(0, len(records) - 1))
  features = source._features  # pylint: disable=protected-access
  raw = dict(features.deserialize_example_np(records[i]))
  good = b"long" not in raw["conversations"]  # row 2 is too long
  mutation = draw(st.sampled_from(["none", "image", "conversation", "id", "flip", "truncate",
                                   "insert"]))
  if mutation == "image":
    name = draw(st.sampled_from(sorted(LLAVA_IMAGES)))
    raw["images"] = [] if name == "empty" else [base64.b64decode(B64_IMAGES[name])]
    good = good and LLAVA_IMAGES[name]
  elif mutation == "conversation":
    text = draw(st.sampled_from(sorted(CONVERSATIONS)))
    raw["conversations"], good = text.encode("utf-8"), CONVERSATIONS[text]
    if draw(st.booleans()):
      raw["conversations"] = raw["conversations"].replace(b"A", draw(
          st.sampled_from(INVALID_UTF8)))
      good = good and b"A" not in text.encode()
  elif mutation == "id":
    raw["id"] = draw(st.sampled_from([b"x", b"", b"q\xff"]))
    good = good and raw["id"] != b"q\xff"
  record = features.serialize_example(raw)
  kind = "good" if good else "bad"
  if mutation in ("flip", "truncate", "insert"):
    kind, record = "unknown", bytearray(record)
    if mutation == "flip":
      for _ in range(draw(st.integers(1, 3))):
        record[draw(st.integers(0, len(record) - 1))] ^= draw(st.integers(1, 255))
    elif mutation == "truncate":
      record = record[:draw(st.integers(0, len(record) - 1))]
    else:
      at = draw(st.integers(0, len(record)))
      record[at:at] = draw(st.binary(min_size=1, max_size=8))
    record = bytes(record)
  return record, kind


def check_training_example(out, tok, length: int) -> None:
  """A preprocessed conversation: image f32 [S, S, 3] in [-1, 1], tokens i32 [T] with one
  image placeholder, loss_mask f32 [T] of 0s and 1s with some loss."""
  assert out["image"].shape == (SIZE, SIZE, 3) and out["image"].dtype == np.float32
  assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
  assert out["tokens"].shape == (length,) and out["tokens"].dtype == np.int32
  assert (out["tokens"] == tok.image_id).sum() == 1
  assert out["loss_mask"].shape == (length,) and out["loss_mask"].dtype == np.float32
  assert set(np.unique(out["loss_mask"])) <= {0.0, 1.0} and out["loss_mask"].sum() > 0


@fuzz(500)
@given(st.data())
def test_llava_tfds_records(llava_build, data):
  source, tok = llava_build
  record, kind = data.draw(llava_record(source, raw_records(source)))
  index = data.draw(st.integers(0, 10**6))
  preprocess = pipeline.ConversationPreprocess(lambda: tok, SIZE, LLAVA_LENGTH)
  try:
    out = preprocess.map(source.decode(record, index))
    event("preprocessed")
  except InputError as e:
    event(e.reason)
    assert kind != "good", e
    assert isinstance(e, MalformedRowError) and e.row == index, e
    assert source.name in str(e) and f"record {index}:" in str(e), e
    return
  assert kind != "bad", record
  check_training_example(out, tok, LLAVA_LENGTH)


# --- The pipeline's skip policy ---------------------------------------------------------

class Records:
  """Random access: stored records, read by ``source.decode`` and ``preprocess``."""

  def __init__(self, source, records, preprocess):
    self.source, self.records, self.preprocess = source, records, preprocess

  def __len__(self):
    return len(self.records)

  def __getitem__(self, k):
    return self.preprocess(self.source.decode(self.records[k], k))


def reason_of(example) -> str:
  reason = example.pop(pipeline._REASON_KEY)  # pylint: disable=protected-access
  return bytes(reason).rstrip(b"\0").decode()


@fuzz(150)
@given(st.data())
def test_skip_bad_records_keeps_batches_full_and_counts(scene_source, llava_build, data):
  if data.draw(st.booleans()):
    source, tok = llava_build
    draw_record = llava_record(source, raw_records(source))
    preprocess = pipeline.ConversationPreprocess(lambda: tok, SIZE, LLAVA_LENGTH).map
    check = lambda ex: check_training_example(ex, tok, LLAVA_LENGTH)
  else:
    source, draw_record, preprocess, check = (
        scene_source, scene_record(scene_source, raw_records(scene_source)), dict, check_scene)
  cases = data.draw(st.lists(draw_record, min_size=1, max_size=8))
  dataset = Records(source, [r for r, _ in cases], preprocess)
  good = []
  for k in range(len(dataset)):
    try:
      dataset[k]
      good.append(k)
    except InputError:
      pass
  kinds = [kind if isinstance(kind, str) else "unknown" for _, kind in cases]
  assert all(kinds[k] != "bad" for k in good)
  assert all(kinds[k] != "good" for k in range(len(cases)) if k not in good)
  skipping = pipeline.SkipBadRecords(dataset)
  if not good:
    with pytest.raises(InputError, match="records in a row are bad"):
      skipping[0]
    return
  skipped = 0
  for k in range(len(dataset)):
    ex = skipping[k]
    skipped += bool(reason_of(ex))
    check(ex)
  assert len(good) + skipped == len(dataset)


def test_make_iterator_skips_or_stops_at_a_bad_record(llava_build):
  """Row 2 of the build needs more than LLAVA_LENGTH tokens: "error" stops, naming the
  build and the record; "skip" feeds full batches and counts it as "too long"."""
  source, tok = llava_build
  preprocess = pipeline.ConversationPreprocess(lambda: tok, SIZE, LLAVA_LENGTH)
  it = pipeline.make_iterator(source, preprocess, 3, seed=0)
  with pytest.raises(MalformedRowError, match=rf"{re.escape(source.name)}: record \d: too "
                     rf"long: row 2 \(id 'q2'\): needs \d+ text tokens and 1 image\(s\) but a "
                     rf"row holds {LLAVA_LENGTH - 1} and 1 \(config\.data\."
                     rf"max_text_length={LLAVA_LENGTH}"):
    next(it)
  skipped = pipeline.SkippedRecords()
  it = pipeline.make_iterator(source, preprocess, 3, seed=0, on_bad_record="skip",
                              skipped=skipped)
  for _ in range(2):
    batch = next(it)
    assert set(batch) == {"image", "tokens", "loss_mask"}
    assert batch["tokens"].shape == (3, LLAVA_LENGTH)
    assert ((batch["tokens"] == tok.image_id).sum(axis=1) == 1).all()
  assert skipped.counts() == {"too long": 2}  # once per epoch
  with pytest.raises(ConfigError, match="config.data.on_bad_record"):
    pipeline.make_iterator(source, preprocess, 3, seed=0, on_bad_record="ignore")


def test_a_question_too_long_for_its_row_is_a_bad_record(llava_build):
  """The suite's examples (QAPreprocess): one whose prompt and answer exceed
  config.data.max_text_length stops the run in one line, or is skipped and counted."""
  _, tok = llava_build
  image = np.zeros((scenes.BASE_SIZE, scenes.BASE_SIZE, 3), np.uint8)
  source = [{"question": "what colour is it" + " really" * (40 if k == 1 else 0),
             "answer": "red", "image": image} for k in range(4)]
  preprocess = pipeline.QAPreprocess(lambda: tok, max_text_length=LLAVA_LENGTH)
  with pytest.raises(InputError, match=rf"^example needs \d+ tokens but config\.data\."
                     rf"max_text_length is {LLAVA_LENGTH}: 'what colour is it really"):
    [preprocess.map(example) for example in source]
  skipped = pipeline.SkippedRecords()
  it = pipeline.make_iterator(source, preprocess, 3, seed=0, on_bad_record="skip",
                              skipped=skipped)
  assert next(it)["tokens"].shape == (3, LLAVA_LENGTH)
  assert skipped.counts() == {"too long": 1}


def test_skip_policy_in_the_config():
  from tokenflex_jax.app import config_schema  # pylint: disable=import-outside-toplevel
  assert config_schema.base_config().data.on_bad_record == "error"
  assert pipeline.check_bad_record_policy("skip") == "skip"


def test_errors_pickle_for_worker_processes():
  import pickle  # pylint: disable=import-outside-toplevel
  e = MalformedRowError("a.json", 3, "too long", "row 3", unit="record")
  back = pickle.loads(pickle.dumps(e))
  assert str(back) == str(e) == "a.json: record 3: too long: row 3" and back.reason == "too long"
  e = images.ImageError(images.TOO_LARGE, "big")
  assert pickle.loads(pickle.dumps(e)).reason == images.TOO_LARGE
