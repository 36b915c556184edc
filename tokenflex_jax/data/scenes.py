"""The procedural VQA suite: scenes, questions, answers and dense labels (pure numpy).

Every example is a function of ``(seed, index)`` only. Each question family draws its own
kind of scene and asks one question about it. Geometry is defined on a 32x32 base grid
and scaled to ``image_size`` (a 64-pixel image is the 32-pixel scene at twice the
resolution), so which families need fine visual tokens does not depend on the size.

Granularity, for a 32x32 image cut into 2x2-pixel patches (a 16x16 grid), pooled to
n x n visual tokens (each token averages a window of about 32/n pixels):
- coarse: answerable from a few pooled tokens (background or one big shape's colour);
- medium: shape, count and layout of objects of 6 pixels or more, whose information
  survives pooling at every count (``shape``, ``count``, ``quadrant``), and ``tiles``;
- budget-graded: ``tiles`` (medium) and ``marks`` (fine) ask the colour of the top-left
  mark of a 2x2 block of marks of distinct colours, each mark m x m pixels (tiles: m in
  4..6, marks: 2..4) at a random place; ``stripes`` (fine) the colour of the left one of
  four adjacent stripes of distinct colours, each w pixels wide (2..4) and 8 tall. A
  mark's or stripe's colour survives pooling when some visual token is mostly (> 50%)
  that mark, which needs windows no wider than about the mark: the share of solvable
  questions grows with the count (`studies/pooling_geometry.py` computes it exactly;
  docs/data.md has the table). A stripe is as tall as two windows even at 64 tokens, so
  only its width limits it: it resolves at fewer tokens than a mark of the same width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

BASE_SIZE = 32  # Geometry below is in pixels of a BASE_SIZE x BASE_SIZE image.
COLOR_JITTER = 10  # Per-object, per-channel uniform jitter of the rendered RGB.

COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 200, 60)),
    ("blue", (40, 70, 230)),
    ("yellow", (235, 220, 40)),
    ("cyan", (40, 220, 230)),
    ("magenta", (220, 50, 220)),
    ("white", (245, 245, 245)),
    ("black", (15, 15, 15)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLORS)
_PALETTE = np.array([rgb for _, rgb in COLORS], np.int32)  # [8, 3]

# Object type ids of `object_map` (0 = background).
NONE, CIRCLE, SQUARE, TRIANGLE, CROSS, MARK = range(6)
OBJECT_NAMES: tuple[str, ...] = ("none", "circle", "square", "triangle", "cross", "mark")
NUM_OBJECT_TYPES = len(OBJECT_NAMES)
SHAPES: tuple[int, ...] = (CIRCLE, SQUARE, TRIANGLE, CROSS)

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
QUADRANTS: tuple[tuple[str, int, int], ...] = (  # (name, row, column) of the 2x2 split
    ("top left", 0, 0), ("top right", 0, 1), ("bottom left", 1, 0), ("bottom right", 1, 1))


class _Canvas:
  """One scene being painted: image uint8 [H,W,3] plus colour/object maps int32 [H,W]."""

  def __init__(self, image_size: int, background: int, rng: np.random.Generator):
    self.size = image_size
    self.rng = rng
    scale = image_size / BASE_SIZE
    centres = (np.arange(image_size) + 0.5) / scale - 0.5  # base-grid coordinate per pixel
    self.yy, self.xx = np.meshgrid(centres, centres, indexing="ij")  # [H, W] each
    cells = (np.arange(image_size) * BASE_SIZE) // image_size  # base pixel per pixel
    self.cy, self.cx = np.meshgrid(cells, cells, indexing="ij")  # [H, W] each
    self.color_map = np.full((image_size, image_size), background, np.int32)
    self.object_map = np.zeros((image_size, image_size), np.int32)
    self.image = np.empty((image_size, image_size, 3), np.uint8)
    self.image[...] = self._jittered(background)

  def _jittered(self, color: int) -> np.ndarray:
    rgb = _PALETTE[color] + self.rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return np.clip(rgb, 0, 255).astype(np.uint8)

  def paint(self, mask: np.ndarray, color: int, obj: int) -> None:
    """Paints boolean mask [H, W] with one jittered colour and object id."""
    self.image[mask] = self._jittered(color)
    self.color_map[mask] = color
    self.object_map[mask] = obj

  def shape_mask(self, kind: int, cy: float, cx: float, half: float) -> np.ndarray:
    """Bool [H, W]: a shape of half-size ``half`` (base pixels) centred at (cy, cx)."""
    dy, dx = self.yy - cy, self.xx - cx
    if kind == CIRCLE:
      return dy * dy + dx * dx < half * half  # strict: no one-pixel nubs on the axes
    if kind == SQUARE:
      return np.maximum(np.abs(dy), np.abs(dx)) <= half
    if kind == TRIANGLE:  # apex up, base 2*half wide at the bottom
      return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2 + 0.5)
    if kind == CROSS:
      arm = max(1.0, half / 3)
      return (((np.abs(dx) <= arm) & (np.abs(dy) <= half))
              | ((np.abs(dy) <= arm) & (np.abs(dx) <= half)))
    raise ValueError(f"not a shape id: {kind}")

  def box_mask(self, y: int, x: int, height: int, width: int | None = None) -> np.ndarray:
    """Bool [H, W]: the height x width (default: square) box of base pixels with top-left
    (y, x)."""
    width = height if width is None else width
    return (self.cy >= y) & (self.cy < y + height) & (self.cx >= x) & (self.cx < x + width)


def _other_colors(rng: np.random.Generator, exclude: int, n: int) -> np.ndarray:
  """n distinct colour ids, none equal to ``exclude``: int [n]."""
  choices = np.array([c for c in range(len(COLORS)) if c != exclude])
  return rng.choice(choices, size=n, replace=False)


def _place_apart(rng: np.random.Generator, halves: list[int], gap: int) -> list[tuple[int, int]]:
  """Centres (y, x) for boxes of the given half-sizes, inside the image, ``gap`` apart."""
  while True:  # a box that finds no place starts the layout again
    centres: list[tuple[int, int]] = []
    for h in halves:
      for _ in range(50):
        y, x = (int(v) for v in rng.integers(h + 1, BASE_SIZE - h - 1, size=2))
        if all(max(abs(y - py), abs(x - px)) >= h + ph + gap
               for (py, px), ph in zip(centres, halves)):
          centres.append((y, x))
          break
      else:
        break
    if len(centres) == len(halves):
      return centres


# --- The families: each paints a fresh canvas and returns (question, answer). ---

def _background(c: _Canvas, bg: int) -> tuple[str, str]:
  if c.rng.random() < 0.5:  # a small distractor shape of another colour
    half = int(c.rng.integers(2, 4))
    y, x = c.rng.integers(half + 1, BASE_SIZE - half - 1, size=2)
    kind = int(c.rng.choice(SHAPES))
    c.paint(c.shape_mask(kind, y, x, half), int(_other_colors(c.rng, bg, 1)[0]), kind)
  return "What colour is the background?", COLOR_NAMES[bg]


def _big_shape(c: _Canvas, bg: int) -> tuple[int, int]:
  """Paints one large shape of a non-background colour; returns (shape id, colour id)."""
  kind, color = int(c.rng.choice(SHAPES)), int(_other_colors(c.rng, bg, 1)[0])
  half = int(c.rng.integers(7, 11))
  y, x = c.rng.integers(half + 1, BASE_SIZE - half - 1, size=2)
  c.paint(c.shape_mask(kind, y, x, half), color, kind)
  return kind, color


def _shape_color(c: _Canvas, bg: int) -> tuple[str, str]:
  _, color = _big_shape(c, bg)
  return "What colour is the shape?", COLOR_NAMES[color]


def _shape(c: _Canvas, bg: int) -> tuple[str, str]:
  kind, _ = _big_shape(c, bg)
  return "What shape is it?", OBJECT_NAMES[kind]


def _count(c: _Canvas, bg: int) -> tuple[str, str]:
  n = int(c.rng.integers(1, 5))
  halves = [int(h) for h in c.rng.integers(3, 5, size=n)]
  for (y, x), h in zip(_place_apart(c.rng, halves, gap=2), halves):
    kind = int(c.rng.choice(SHAPES))
    c.paint(c.shape_mask(kind, y, x, h), int(_other_colors(c.rng, bg, 1)[0]), kind)
  return "How many shapes are there?", COUNT_WORDS[n - 1]


def _quadrant(c: _Canvas, bg: int) -> tuple[str, str]:
  colors = _other_colors(c.rng, bg, 4)
  quarter = BASE_SIZE // 4
  for (_, row, col), color in zip(QUADRANTS, colors):
    half = int(c.rng.integers(3, 6))
    y, x = (quarter * (2 * row + 1) + c.rng.integers(-2, 3),
            quarter * (2 * col + 1) + c.rng.integers(-2, 3))
    kind = int(c.rng.choice(SHAPES))
    c.paint(c.shape_mask(kind, y, x, half), int(color), kind)
  q = int(c.rng.integers(4))
  return f"What colour is the shape in the {QUADRANTS[q][0]}?", COLOR_NAMES[int(colors[q])]


# Mark sides (base pixels) of the budget-graded families, and where a block may start.
TILE_SIDES: tuple[int, ...] = (4, 5, 6)
MARK_SIDES: tuple[int, ...] = (2, 3, 4)
BLOCK_ANCHORS: tuple[int, ...] = tuple(range(2, 10))  # top-left base pixel, per axis


def block_anchors(side: int) -> tuple[int, ...]:
  """Where a block of marks of ``side`` may start (per axis). 2-pixel marks start on even
  pixels, so that each is one patch: otherwise no patch, and no token, is mostly one mark."""
  return tuple(a for a in BLOCK_ANCHORS if side != 2 or a % 2 == 0)


def _mark_block(c: _Canvas, bg: int, sides: tuple[int, ...], noun: str) -> tuple[str, str]:
  # A 2x2 block of m x m marks of distinct colours at a random place; the question asks
  # the top-left one, which pooling mixes with its neighbours unless some token's window
  # lies mostly inside it.
  side = int(c.rng.choice(sides))
  anchors = block_anchors(side)
  y0, x0 = (int(anchors[i]) for i in c.rng.integers(len(anchors), size=2))
  colors = _other_colors(c.rng, bg, 4)
  for (_, row, col), color in zip(QUADRANTS, colors):
    c.paint(c.box_mask(y0 + row * side, x0 + col * side, side), int(color), MARK)
  return f"What colour is the top left {noun}?", COLOR_NAMES[int(colors[0])]


STRIPE_WIDTHS: tuple[int, ...] = (2, 3, 4)
STRIPE_HEIGHT = 8


def _stripes(c: _Canvas, bg: int) -> tuple[str, str]:
  # Four adjacent vertical stripes of distinct colours; the question asks the left one,
  # which pooling mixes with its neighbour unless some token's window lies mostly in it.
  width = int(c.rng.choice(STRIPE_WIDTHS))
  y0 = int(c.rng.choice(BLOCK_ANCHORS))
  x0 = int(c.rng.choice(block_anchors(width)))
  colors = _other_colors(c.rng, bg, 4)
  for k, color in enumerate(colors):
    c.paint(c.box_mask(y0, x0 + k * width, STRIPE_HEIGHT, width), int(color), MARK)
  return "What colour is the left stripe?", COLOR_NAMES[int(colors[0])]


def _tiles(c: _Canvas, bg: int) -> tuple[str, str]:
  return _mark_block(c, bg, TILE_SIDES, "tile")


def _marks(c: _Canvas, bg: int) -> tuple[str, str]:
  return _mark_block(c, bg, MARK_SIDES, "mark")


@dataclasses.dataclass(frozen=True)
class Family:
  """A question family: what it asks, how fine the needed detail is, its chance level."""
  name: str
  granularity: str  # "coarse" | "medium" | "fine"
  chance: float  # 1 / len(answers): accuracy of guessing uniformly over the answer set
  questions: tuple[str, ...]
  answers: tuple[str, ...]
  render: Callable[[_Canvas, int], tuple[str, str]] = dataclasses.field(repr=False,
                                                                         compare=False)


def _family(name: str, granularity: str, questions: tuple[str, ...], answers: tuple[str, ...],
            render: Callable[[_Canvas, int], tuple[str, str]]) -> Family:
  return Family(name, granularity, 1.0 / len(answers), questions, answers, render)


FAMILIES: tuple[Family, ...] = (
    _family("background", "coarse", ("What colour is the background?",), COLOR_NAMES,
            _background),
    _family("shape_color", "coarse", ("What colour is the shape?",), COLOR_NAMES,
            _shape_color),
    _family("shape", "medium", ("What shape is it?",),
            tuple(OBJECT_NAMES[s] for s in SHAPES), _shape),
    _family("count", "medium", ("How many shapes are there?",), COUNT_WORDS[:4], _count),
    _family("quadrant", "medium",
            tuple(f"What colour is the shape in the {q}?" for q, _, _ in QUADRANTS),
            COLOR_NAMES, _quadrant),
    _family("tiles", "medium", ("What colour is the top left tile?",), COLOR_NAMES, _tiles),
    _family("marks", "fine", ("What colour is the top left mark?",), COLOR_NAMES, _marks),
    _family("stripes", "fine", ("What colour is the left stripe?",), COLOR_NAMES, _stripes),
)
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
# The suite a run asks by default (config.data.families' default, the TFDS build's, the
# project tokenizer's corpus): every family but those added since (``stripes``), so that
# adding a family changes no existing run.
DEFAULT_FAMILIES: tuple[str, ...] = ("background", "shape_color", "shape", "count",
                                     "quadrant", "tiles", "marks")


def get_family(name: str) -> Family:
  """The family called ``name``; ValueError naming it if there is none."""
  for family in FAMILIES:
    if family.name == name:
      return family
  raise ValueError(f"unknown question family {name!r}; known: {', '.join(FAMILY_NAMES)}")


@functools.lru_cache(maxsize=None)
def visible_chance(name: str, examples: int = 200) -> float:
  """The accuracy of a guesser who sees which colours an image holds but not where: for
  a family answered by a colour, the mean over ``examples`` of 1 / (colours in the
  image); otherwise `Family.chance` (uniform over the answers). A ``marks`` block shows
  four colours on a background, so its guesser is right one time in five, not in eight."""
  family = get_family(name)
  if family.answers != COLOR_NAMES:
    return family.chance
  shares = [1.0 / len(np.unique(generate_example(0, i, families=(name,))["color_map"]))
            for i in range(examples)]
  return float(np.mean(shares))


def family_probs(families: tuple[str, ...],
                 family_weights: tuple[float, ...] | None) -> np.ndarray:
  """Validated sampling probabilities over ``families``: float64 [F]."""
  if not families:
    raise ValueError("families must name at least one family")
  for name in families:
    get_family(name)
  if family_weights is None:
    return np.full(len(families), 1.0 / len(families))
  if len(family_weights) != len(families):
    raise ValueError(f"{len(family_weights)} family_weights for {len(families)} families "
                     f"{families}")
  w = np.asarray(family_weights, np.float64)
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"family_weights must be >= 0 with a positive sum, got {family_weights}")
  return w / w.sum()


def generate_example(seed: int, index: int, *, image_size: int = BASE_SIZE,
                     families: tuple[str, ...] = DEFAULT_FAMILIES,
                     family_weights: tuple[float, ...] | None = None) -> dict[str, Any]:
  """One example, a pure function of (seed, index).

  Returns {"image": uint8 [H, W, 3], "question": str, "answer": str, "family": str,
  "color_map": int32 [H, W] (colour id per pixel), "object_map": int32 [H, W] (object
  type id per pixel, 0 = background)}, with H = W = image_size.
  """
  if image_size < BASE_SIZE:
    raise ValueError(f"image_size must be >= {BASE_SIZE}, got {image_size}")
  probs = family_probs(tuple(families), family_weights)
  rng = np.random.default_rng([seed, index])
  family = get_family(families[int(rng.choice(len(families), p=probs))])
  background = int(rng.integers(len(COLORS)))
  canvas = _Canvas(image_size, background, rng)
  question, answer = family.render(canvas, background)
  return {"image": canvas.image, "question": question, "answer": answer,
          "family": family.name, "color_map": canvas.color_map,
          "object_map": canvas.object_map}


def patch_labels(color_map: np.ndarray, object_map: np.ndarray,
                 patch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-patch labels from per-pixel maps [..., H, W] -> ([..., H/p, W/p], [..., H/p, W/p]).

  Object label: the largest object id inside the patch. Colour label: the colour of the
  first pixel (raster order inside the patch) holding that object id, which is the
  background colour when the patch holds no object.
  """
  *lead, h, w = object_map.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"maps of size {h}x{w} are not divisible by patch_size={p}")

  def cells(a: np.ndarray) -> np.ndarray:  # [..., H, W] -> [..., H/p, W/p, p*p]
    a = a.reshape(*lead, h // p, p, w // p, p)
    a = np.moveaxis(a, -3, -2)
    return a.reshape(*lead, h // p, w // p, p * p)

  obj, col = cells(object_map), cells(color_map)
  first = np.argmax(obj, axis=-1)[..., None]  # first position of the maximum
  return (np.take_along_axis(col, first, -1)[..., 0],
          np.take_along_axis(obj, first, -1)[..., 0])


def corpus_texts(families: tuple[str, ...] = DEFAULT_FAMILIES) -> list[str]:
  """Every question and answer ``families`` can emit, once each, in a fixed order."""
  texts: list[str] = []
  for family in (f for f in FAMILIES if f.name in families):
    for text in family.questions + family.answers:
      if text not in texts:
        texts.append(text)
  return texts


class SceneSource:
  """A grain RandomAccessDataSource of ``generate_example(seed, i)`` for i < num_examples."""

  def __init__(self, seed: int, num_examples: int, image_size: int = BASE_SIZE,
               families: tuple[str, ...] = FAMILY_NAMES,
               family_weights: tuple[float, ...] | None = None):
    family_probs(tuple(families), family_weights)  # fail here, not inside a worker
    self.seed = seed
    self.num_examples = num_examples
    self.image_size = image_size
    self.families = tuple(families)
    self.family_weights = None if family_weights is None else tuple(family_weights)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return generate_example(self.seed, int(index), image_size=self.image_size,
                            families=self.families, family_weights=self.family_weights)

  def __repr__(self) -> str:
    return (f"SceneSource(seed={self.seed}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, families={self.families}, "
            f"family_weights={self.family_weights})")
