"""The budget-graded families' solvable share, from the pooling geometry."""

import numpy as np
import pytest

from tokenflex_jax.data import scenes
from tokenflex_jax.studies import pooling_geometry

COUNTS = (64, 100, 144, 196, 256)


def test_pixel_weights_are_averaging_windows():
  for n in COUNTS:
    for mode in ("adaptive_avg", "resize_avg"):
      w = pooling_geometry.pixel_weights(n, mode)
      assert w.shape == (int(np.sqrt(n)), scenes.BASE_SIZE)
      np.testing.assert_allclose(w.sum(1), 1.0)
  # 8 tokens per axis average 4 base pixels each; 16 tokens, one 2-pixel patch each.
  np.testing.assert_allclose(pooling_geometry.pixel_weights(64, "adaptive_avg")[1, 4:8], 0.25)
  np.testing.assert_allclose(pooling_geometry.pixel_weights(256, "adaptive_avg")[3, 6:8], 0.5)


def test_solvable_follows_the_windows():
  # A 4-pixel mark on a 4-pixel token cell is one token at 64; shifted by 2 it is half of
  # two tokens per axis (a quarter of four tokens), and mixed.
  assert pooling_geometry.solvable(4, 4, 4, 64, "adaptive_avg")
  assert not pooling_geometry.solvable(4, 6, 6, 64, "adaptive_avg")
  # A 2-pixel mark on a patch survives only at one token per patch.
  assert pooling_geometry.solvable(2, 4, 4, 256, "adaptive_avg")
  assert not any(pooling_geometry.solvable(2, 4, 4, n, "adaptive_avg") for n in COUNTS[:-1])


def _check_brute_force(side, y0, x0, n, mode):
  """The same criterion from a painted mask pooled like the model pools features."""
  mask = np.zeros((scenes.BASE_SIZE, scenes.BASE_SIZE))
  mask[y0:y0 + side, x0:x0 + side] = 1.0
  w = pooling_geometry.pixel_weights(n, mode)
  return float((w @ mask @ w.T).max()) > 0.5


@pytest.mark.parametrize("mode", ["adaptive_avg", "resize_avg"])
def test_solvable_matches_a_pooled_mask(mode):
  for side in (2, 3, 4, 5):
    for y0, x0 in ((2, 3), (5, 5), (8, 2)):
      for n in COUNTS:
        assert pooling_geometry.solvable(side, y0, x0, n, mode) == \
            _check_brute_force(side, y0, x0, n, mode)


def test_marks_need_more_tokens_than_tiles():
  marks = [pooling_geometry.solvable_share("marks", n) for n in COUNTS]
  tiles = [pooling_geometry.solvable_share("tiles", n) for n in COUNTS]
  assert marks[-1] == tiles[-1] == 1.0  # everything survives one token per patch
  # The trained counts 64 < 144 < 256 resolve strictly more marks; 196 between.
  assert marks[0] < marks[2] < marks[3] < marks[4]
  assert marks[0] < 0.3 and tiles[0] > 0.8
  assert all(t >= m for t, m in zip(tiles, marks))
  # adaptive_avg at 100 tokens pools some 3-patch windows: coarser than 64 (docs/data.md).
  assert marks[1] < marks[0]
  assert "| marks | 2, 3, 4 | adaptive_avg | 27 | 12 | 44 | 67 | 100 |" in \
      pooling_geometry.markdown_table()
  with pytest.raises(ValueError, match="shape"):
    pooling_geometry.solvable_share("shape", 64)


def test_stripes_carry_the_count_effect_too():
  """A stripe is two windows tall at every count, so its width alone decides: solvable
  more often than a mark of the same width at 64 tokens, and more with every trained
  count."""
  stripes = [pooling_geometry.solvable_share("stripes", n) for n in COUNTS]
  marks = [pooling_geometry.solvable_share("marks", n) for n in COUNTS]
  assert stripes[0] < stripes[2] < stripes[3] < stripes[4] == 1.0
  assert stripes[0] > marks[0]
  # An 8 x 3 stripe on a token column at 64 tokens: 3 of the window's 4 pixels wide.
  assert pooling_geometry.solvable(3, 4, 4, 64, "adaptive_avg", height=8)
  assert not pooling_geometry.solvable(2, 4, 4, 64, "adaptive_avg", height=8)
