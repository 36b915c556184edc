"""The procedural scene suite: determinism, answer validity, label maps, fine detail."""

import pickle

import numpy as np
import pytest

from tokenflex_jax.data import scenes

N_PER_FAMILY = 40


def _examples(family: str, n: int = N_PER_FAMILY, seed: int = 7, image_size: int = 32):
  return [scenes.generate_example(seed, i, image_size=image_size, families=(family,))
          for i in range(n)]


def _assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
      assert a[k].dtype == b[k].dtype
    else:
      assert a[k] == b[k]


def test_deterministic_in_seed_and_index():
  _assert_same(scenes.generate_example(3, 11), scenes.generate_example(3, 11))
  a, b, c = (scenes.generate_example(s, i) for s, i in ((3, 11), (3, 12), (4, 11)))
  assert not np.array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("family", scenes.FAMILY_NAMES)
@pytest.mark.parametrize("image_size", [32, 64])
def test_every_family_gives_valid_examples(family, image_size):
  spec = scenes.get_family(family)
  answers = set()
  for ex in _examples(family, image_size=image_size):
    assert ex["family"] == family
    assert ex["question"] in spec.questions
    assert ex["answer"] in spec.answers
    answers.add(ex["answer"])
    assert ex["image"].shape == (image_size, image_size, 3) and ex["image"].dtype == np.uint8
    for key in ("color_map", "object_map"):
      assert ex[key].shape == (image_size, image_size) and ex[key].dtype == np.int32
    assert ex["color_map"].min() >= 0 and ex["color_map"].max() < len(scenes.COLORS)
    assert ex["object_map"].min() >= 0 and ex["object_map"].max() < scenes.NUM_OBJECT_TYPES
    # The image is the colour map painted with +-COLOR_JITTER around the palette.
    palette = np.array([rgb for _, rgb in scenes.COLORS])
    err = np.abs(ex["image"].astype(int) - palette[ex["color_map"]])
    assert err.max() <= scenes.COLOR_JITTER
  assert len(answers) >= min(3, len(spec.answers))  # not a constant answer


def test_family_table():
  assert len(set(scenes.FAMILY_NAMES)) == len(scenes.FAMILIES)
  assert len(set(scenes.COLOR_NAMES)) == len(scenes.COLORS) == 8
  for f in scenes.FAMILIES:
    assert f.granularity in ("coarse", "medium", "fine")
    assert len(set(f.answers)) == len(f.answers)
    assert f.chance == pytest.approx(1.0 / len(f.answers))
  grains = {f.name: f.granularity for f in scenes.FAMILIES}
  assert grains["background"] == grains["shape_color"] == "coarse"
  assert grains["tiles"] == "medium" and grains["marks"] == "fine"


def test_palette_is_well_separated():
  palette = np.array([rgb for _, rgb in scenes.COLORS], float)
  dist = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
  np.fill_diagonal(dist, np.inf)
  assert dist.min() > 4 * scenes.COLOR_JITTER * np.sqrt(3)


def test_answers_match_the_scene():
  name_to_color = {n: i for i, n in enumerate(scenes.COLOR_NAMES)}
  for ex in _examples("background"):
    assert ex["color_map"][0, 0] == name_to_color[ex["answer"]]
  for ex in _examples("shape_color"):
    assert set(ex["color_map"][ex["object_map"] > 0].tolist()) == {name_to_color[ex["answer"]]}
  for ex in _examples("shape"):
    assert set(np.unique(ex["object_map"]).tolist()) == {
        0, scenes.OBJECT_NAMES.index(ex["answer"])}
    assert (ex["object_map"] > 0).sum() >= 40  # large
  for ex in _examples("quadrant"):
    name = ex["question"].removeprefix("What colour is the shape in the ").removesuffix("?")
    row, col = next((r, c) for q, r, c in scenes.QUADRANTS if q == name)
    quarter = ex["object_map"][16 * row:16 * row + 16, 16 * col:16 * col + 16] > 0
    colors = ex["color_map"][16 * row:16 * row + 16, 16 * col:16 * col + 16][quarter]
    assert set(colors.tolist()) == {name_to_color[ex["answer"]]}


@pytest.mark.parametrize("family,sides", [("tiles", scenes.TILE_SIDES),
                                          ("marks", scenes.MARK_SIDES)])
def test_mark_blocks_are_four_squares_of_one_listed_side(family, sides):
  name_to_color = {n: i for i, n in enumerate(scenes.COLOR_NAMES)}
  seen_sides, seen_anchors = set(), set()
  for ex in _examples(family, n=120):
    ys, xs = np.nonzero(ex["object_map"] == scenes.MARK)
    y0, x0 = int(ys.min()), int(xs.min())
    side = (int(ys.max()) - y0 + 1) // 2
    assert side in sides and len(ys) == 4 * side * side  # a full 2x2 block of squares
    assert y0 in scenes.block_anchors(side) and x0 in scenes.block_anchors(side)
    block = ex["color_map"][y0:y0 + 2 * side, x0:x0 + 2 * side]
    quads = [block[r * side:(r + 1) * side, c * side:(c + 1) * side]
             for r in range(2) for c in range(2)]
    assert all(len(np.unique(q)) == 1 for q in quads)  # each mark is one colour
    assert len({int(q[0, 0]) for q in quads}) == 4  # of four distinct colours
    assert int(quads[0][0, 0]) == name_to_color[ex["answer"]]  # the top-left one asked
    seen_sides.add(side)
    seen_anchors.add((y0, x0))
  assert seen_sides == set(sides) and len(seen_anchors) > 20


def test_two_pixel_marks_are_one_patch_each():
  for ex in _examples("marks", n=120):
    ys, xs = np.nonzero(ex["object_map"] == scenes.MARK)
    if len(ys) == 16:  # side 2
      assert ys.min() % 2 == 0 and xs.min() % 2 == 0
      _, obj2 = scenes.patch_labels(ex["color_map"], ex["object_map"], 2)
      assert (obj2 == scenes.MARK).sum() == 4


def _patch_labels_loop(color_map, object_map, p):
  h, w = object_map.shape
  color = np.zeros((h // p, w // p), np.int64)
  obj = np.zeros((h // p, w // p), np.int64)
  for i in range(h // p):
    for j in range(w // p):
      best, best_color = -1, -1
      for y in range(i * p, i * p + p):
        for x in range(j * p, j * p + p):
          if object_map[y, x] > best:
            best, best_color = object_map[y, x], color_map[y, x]
      color[i, j], obj[i, j] = best_color, best
  return color, obj


@pytest.mark.parametrize("p", [2, 4])
def test_patch_labels_match_brute_force(p):
  rng = np.random.default_rng(0)
  colors = rng.integers(0, 8, size=(3, 16, 16)).astype(np.int32)
  objects = (rng.integers(0, 7, size=(3, 16, 16)) * (rng.random((3, 16, 16)) < 0.3))
  objects = objects.astype(np.int32)
  objects[0] = 0  # one all-background map
  color_b, obj_b = scenes.patch_labels(colors, objects, p)
  assert color_b.shape == obj_b.shape == (3, 16 // p, 16 // p)
  for b in range(3):
    want_color, want_obj = _patch_labels_loop(colors[b], objects[b], p)
    color, obj = scenes.patch_labels(colors[b], objects[b], p)
    np.testing.assert_array_equal(color, want_color)
    np.testing.assert_array_equal(obj, want_obj)
    np.testing.assert_array_equal(color_b[b], want_color)
    np.testing.assert_array_equal(obj_b[b], want_obj)


def test_patch_labels_on_a_scene():
  ex = scenes.generate_example(1, 2, families=("marks",))
  want = _patch_labels_loop(ex["color_map"], ex["object_map"], 2)
  got = scenes.patch_labels(ex["color_map"], ex["object_map"], 2)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  with pytest.raises(ValueError, match="patch_size"):
    scenes.patch_labels(ex["color_map"], ex["object_map"], 5)


def test_bad_families_raise():
  with pytest.raises(ValueError, match="no_such_family"):
    scenes.generate_example(0, 0, families=("shape", "no_such_family"))
  with pytest.raises(ValueError, match="no_such_family"):
    scenes.SceneSource(0, 10, families=("no_such_family",))
  with pytest.raises(ValueError, match="family_weights"):
    scenes.generate_example(0, 0, families=("shape", "marks"), family_weights=(1.0,))


def test_family_weights_pick_families():
  got = {scenes.generate_example(0, i, families=("shape", "marks"),
                                 family_weights=(0.0, 1.0))["family"] for i in range(30)}
  assert got == {"marks"}
  got = {scenes.generate_example(0, i)["family"] for i in range(200)}
  assert got == set(scenes.DEFAULT_FAMILIES)  # every family but the newer ones
  assert set(scenes.FAMILY_NAMES) - got == {"stripes"}


def test_scene_source_is_a_picklable_random_access_source():
  src = scenes.SceneSource(seed=5, num_examples=12, families=("count", "marks"),
                           family_weights=(1.0, 2.0))
  assert len(src) == 12
  clone = pickle.loads(pickle.dumps(src))
  _assert_same(src[3], clone[3])
  _assert_same(src[3], scenes.generate_example(5, 3, families=("count", "marks"),
                                               family_weights=(1.0, 2.0)))
  with pytest.raises(IndexError):
    src[12]  # pylint: disable=pointless-statement


def test_corpus_covers_every_emitted_string():
  corpus = scenes.corpus_texts()
  assert corpus == scenes.corpus_texts()
  assert len(set(corpus)) == len(corpus)
  for i in range(300):
    ex = scenes.generate_example(9, i)
    assert ex["question"] in corpus and ex["answer"] in corpus


def test_stripes_paint_four_stripes_and_ask_the_left_one():
  for i in range(20):
    ex = scenes.generate_example(4, i, families=("stripes",))
    assert ex["question"] == "What colour is the left stripe?"
    marks = ex["object_map"] == scenes.MARK
    ys, xs = np.nonzero(marks)
    assert ys.max() - ys.min() + 1 == scenes.STRIPE_HEIGHT
    width = (xs.max() - xs.min() + 1) // 4
    assert width in scenes.STRIPE_WIDTHS
    left = ex["color_map"][ys.min(), xs.min()]
    assert scenes.COLOR_NAMES[left] == ex["answer"]
    colours = [ex["color_map"][ys.min(), xs.min() + k * width] for k in range(4)]
    assert len(set(colours)) == 4


def test_visible_chance_counts_the_colours_a_guesser_sees():
  # Four marks of distinct colours on a background: one in five.
  assert scenes.visible_chance("marks") == pytest.approx(0.2)
  assert scenes.visible_chance("stripes") == pytest.approx(0.2)
  assert scenes.visible_chance("shape_color") == pytest.approx(0.5)  # shape + background
  assert 0.5 < scenes.visible_chance("background") < 1.0  # a distractor half the time
  assert scenes.visible_chance("count") == scenes.get_family("count").chance  # not a colour
