"""Synthetic conversations shaped like LLaVA-1.5's mix665k: lengths for planning, and
LLaVA-format rows with images (`write_llava`) for the tests and the bench.

The mixture's composition is LLaVA-1.5's (Liu et al., "Improved Baselines with Visual
Instruction Tuning", 2023, Table 7), grouped by image source: 364k COCO conversations
(LLaVA-Instruct, VQAv2, OKVQA, A-OKVQA, RefCOCO; many with several questions), 86k
Visual Genome, 72k GQA, 80k OCR-VQA, 22k TextCaps/TextVQA, and 41k text-only ShareGPT
conversations. The text lengths per source are an assumption, not measured on the
file: log-normal, with medians and spreads (`SOURCES`) chosen so that the mean over the
mixture is about 280 tokens, inside the 150-360 tokens a LLaVA-style tokenizer gives
mix665k, with ShareGPT's long tail. ``multi_image_share`` of the image rows get 2 to
``max_images`` images instead of one (LLaVA-OneVision-style mixes).

Each line of a lengths file is ``{"text_tokens": int, "images": int}`` (image markers not
counted in the text), what ``python -m tokenflex_jax.data.packing --lengths`` reads.

`write_llava` turns the same draws into a LLaVA JSON file and an image folder: each
conversation's text is that many words (a tokenizer makes its own count of them) over
one to four question-answer turns, an image row's markers in its first question
(``"image": [...]`` for several images), text-only rows without ``image``; the images
are small PNGs of random colours.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from tokenflex_jax.data.pack import Lengths
from tokenflex_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  rows: int              # in mix665k
  median_tokens: float   # of the text, an assumption (see the module docstring)
  sigma: float           # of log(tokens)
  images: int            # 1, or 0 for text-only rows


SOURCES = (
    Source("coco", 364_000, 220.0, 0.7, 1),
    Source("visual_genome", 86_000, 180.0, 0.6, 1),
    Source("gqa", 72_000, 150.0, 0.6, 1),
    Source("ocr_vqa", 80_000, 140.0, 0.5, 1),
    Source("textvqa", 22_000, 90.0, 0.5, 1),
    Source("sharegpt", 41_000, 600.0, 0.9, 0),
)
MIN_TOKENS = 8


def mix665k_lengths(num: int, seed: int = 0, multi_image_share: float = 0.0,
                    max_images: int = 4, sources: Sequence[Source] = SOURCES
                    ) -> list[Lengths]:
  """``num`` conversations drawn from ``sources`` by their row counts (deterministic in
  ``seed``)."""
  rng = np.random.default_rng(seed)
  weights = np.array([s.rows for s in sources], np.float64)
  which = rng.choice(len(sources), size=num, p=weights / weights.sum())
  normal = rng.standard_normal(num)
  multi = rng.random(num) < multi_image_share
  extra = rng.integers(2, max_images + 1, size=num) if max_images >= 2 else np.ones(num, int)
  out = []
  for i in range(num):
    s = sources[which[i]]
    tokens = max(MIN_TOKENS, int(round(s.median_tokens * np.exp(s.sigma * normal[i]))))
    images = int(extra[i]) if s.images and multi[i] else s.images
    out.append(Lengths(tokens, images))
  return out


WORDS = ("the", "red", "blue", "square", "image", "shows", "a", "large", "small", "circle",
         "left", "right", "of", "what", "colour", "is", "there", "count", "text", "sign")


def write_llava(directory: str, num: int, seed: int = 0, multi_image_share: float = 0.2,
                max_images: int = 3, image_size: int = 24, scale: float = 1.0,
                sources: Sequence[Source] = SOURCES) -> str:
  """Writes DIRECTORY/train.json (``num`` LLaVA rows, their lengths `mix665k_lengths` x
  ``scale`` words) and DIRECTORY/images/; returns the JSON file's path."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed + 1)
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  rows = []
  for i, c in enumerate(mix665k_lengths(num, seed, multi_image_share, max_images, sources)):
    count = max(4, round(c.text_tokens * scale))
    words = [WORDS[k] for k in rng.integers(len(WORDS), size=count)]
    turns = int(rng.integers(1, 5)) if len(words) >= 16 else 1
    cuts = np.linspace(0, len(words), 2 * turns + 1).round().astype(int)
    texts = [" ".join(words[a:b]) or "yes" for a, b in zip(cuts[:-1], cuts[1:])]
    names = []
    for k in range(c.images):
      names.append(f"{i}_{k}.png")
      buf = io.BytesIO()
      Image.fromarray(np.full((image_size, image_size, 3), rng.integers(256, size=3),
                              np.uint8)).save(buf, format="PNG")
      with open(os.path.join(directory, "images", names[-1]), "wb") as f:
        f.write(buf.getvalue())
    texts[0] = "<image>\n" * c.images + texts[0]
    row = {"id": f"s{i}", "conversations": [
        {"from": "human" if t % 2 == 0 else "gpt", "value": text} for t, text in enumerate(texts)]}
    if names:
      row["image"] = names[0] if len(names) == 1 else names
    rows.append(row)
  path = os.path.join(directory, "train.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(rows, f)
  return path


def write_lengths(path: str, lengths: Sequence[Lengths]) -> None:
  epath.Path(path).write_text("".join(json.dumps(dataclasses.asdict(c)) + "\n"
                                      for c in lengths))


def read_lengths(path: str) -> list[Lengths]:
  """A lengths file; a missing file or a bad line is an `InputError` naming the file
  and line."""
  p = epath.Path(path)
  if not p.exists():
    raise InputError(f"{path}: no such file")
  out = []
  for i, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      text, images = row["text_tokens"], row["images"]
      if not (isinstance(text, int) and isinstance(images, int) and text >= 0 and images >= 0):
        raise ValueError("text_tokens and images must be integers >= 0")
    except (ValueError, KeyError, TypeError) as e:
      raise InputError(f"{path}:{i}: want {{\"text_tokens\": int, \"images\": int}}: "
                       f"{type(e).__name__}: {e}") from None
    out.append(Lengths(text, images))
  if not out:
    raise InputError(f"{path}: no rows")
  return out
