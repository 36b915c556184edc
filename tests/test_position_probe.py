"""The linear position probe, on features that do and do not encode their place."""

import numpy as np
import pytest

from tokenflex_jax.studies.position_probe import linear_probe_r2


def test_probe_reads_a_linear_position_code_and_not_noise():
  rng = np.random.default_rng(0)
  side, n, c = 8, 40, 16
  rows, cols = np.divmod(np.arange(side * side), side)
  mix = rng.normal(size=(2, c))
  coded = (np.stack([rows, cols], 1) @ mix)[None] + 0.1 * rng.normal(size=(n, side * side, c))
  r2 = linear_probe_r2(coded)
  assert r2["row"] > 0.99 and r2["col"] > 0.99
  noise = linear_probe_r2(rng.normal(size=(n, side * side, c)))
  assert abs(noise["row"]) < 0.05 and abs(noise["col"]) < 0.05
  only_rows = linear_probe_r2((rows[:, None] * mix[:1])[None] + 0.1 * rng.normal(
      size=(n, side * side, c)))
  assert only_rows["row"] > 0.99 and only_rows["col"] < 0.05
  with pytest.raises(ValueError, match="side"):
    linear_probe_r2(np.zeros((4, 10, 3)))
