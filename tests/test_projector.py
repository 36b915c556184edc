"""pool_grid against independent loop-based references, and the projector module."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.models.projector import (ProjectorConfig, TokenAdaptiveProjector, pool_grid,
                                            token_side)


def reference_adaptive_avg(grid: np.ndarray, side: int) -> np.ndarray:
  """torch.nn.functional.adaptive_avg_pool2d, written as explicit windows."""
  b, h, w, c = grid.shape
  out = np.zeros((b, side, side, c))
  for i in range(side):
    h0, h1 = math.floor(i * h / side), math.ceil((i + 1) * h / side)
    for j in range(side):
      w0, w1 = math.floor(j * w / side), math.ceil((j + 1) * w / side)
      out[:, i, j] = grid[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def reference_bilinear_align_corners(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Pixel-by-pixel bilinear interpolation with align_corners=True (2-D, not separable)."""
  b, h, w, c = grid.shape
  out = np.zeros((b, out_h, out_w, c))
  for y in range(out_h):
    sy = y * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for x in range(out_w):
      sx = x * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      out[:, y, x] = ((1 - fy) * (1 - fx) * grid[:, y0, x0] + (1 - fy) * fx * grid[:, y0, x1]
                      + fy * (1 - fx) * grid[:, y1, x0] + fy * fx * grid[:, y1, x1])
  return out


def reference_resize_avg(grid: np.ndarray, side: int) -> np.ndarray:
  b, h, w, c = grid.shape
  target = math.ceil(h / side) * side
  if target != h:
    grid = reference_bilinear_align_corners(grid, target, target)
  k = target // side
  return grid.reshape(b, side, k, side, k, c).mean(axis=(2, 4))


@pytest.mark.parametrize("grid_side,tokens", [(16, 144), (27, 144), (16, 64), (16, 256),
                                              (27, 64), (27, 256), (16, 100), (27, 196),
                                              (16, 400)])
@pytest.mark.parametrize("mode", ["adaptive_avg", "resize_avg"])
def test_pool_grid_matches_reference(grid_side, tokens, mode):
  rng = np.random.default_rng(grid_side * 1000 + tokens)
  grid = rng.normal(size=(2, grid_side, grid_side, 3)).astype(np.float64)
  side = token_side(tokens)
  ref = (reference_adaptive_avg if mode == "adaptive_avg" else reference_resize_avg)(grid, side)
  out = pool_grid(jnp.asarray(grid, jnp.float32), side, mode)
  assert out.shape == (2, side, side, 3)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_modes_differ_on_uneven_grid():
  grid = jnp.asarray(np.random.default_rng(0).normal(size=(1, 27, 27, 4)), jnp.float32)
  a = pool_grid(grid, 12, "adaptive_avg")
  b = pool_grid(grid, 12, "resize_avg")
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_pool_grid_rejects_unknown_mode():
  with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
    pool_grid(jnp.zeros((1, 4, 4, 1)), 2, "max")


def test_token_side_rejects_non_square():
  assert token_side(144) == 12
  with pytest.raises(ValueError, match="num_visual_tokens=150"):
    token_side(150)


def test_projector_one_set_of_weights_for_every_count():
  proj = TokenAdaptiveProjector(ProjectorConfig(), out_features=24)
  patches = jax.random.normal(jax.random.key(0), (2, 256, 16))
  params = proj.init(jax.random.key(1), patches, 64)
  shapes = jax.tree.map(jnp.shape, params)
  for n in (64, 100, 144, 196, 256, 36):
    params_n = proj.init(jax.random.key(1), patches, n)
    assert jax.tree.map(jnp.shape, params_n) == shapes
    out = proj.apply(params, patches, n)
    assert out.shape == (2, n, 24)
  # 3C hidden width, as in the paper's SwiGLU.
  mlp = params["params"]["mlp"]
  assert mlp["gate"]["kernel"].value.shape == (16, 48)
  assert mlp["down"]["kernel"].value.shape == (48, 24)


def test_projector_full_count_is_identity_pooling():
  """At 256 tokens from a 16x16 grid the pooling must be the identity."""
  grid = jax.random.normal(jax.random.key(0), (1, 16, 16, 8))
  for mode in ("adaptive_avg", "resize_avg"):
    np.testing.assert_allclose(pool_grid(grid, 16, mode), grid, atol=1e-6)
