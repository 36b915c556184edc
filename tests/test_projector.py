"""pool_grid against independent loop-based references, and the projector module."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.models.projector import (ProjectorConfig, TokenAdaptiveProjector, pool_grid,
                                            pooling_matrix, token_side)


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
  """At 256 tokens from a 16x16 grid the pooling is the identity: both modes' matrices
  are, so pool_grid returns the grid exactly."""
  grid = jax.random.normal(jax.random.key(0), (1, 16, 16, 8))
  for mode in ("adaptive_avg", "resize_avg"):
    np.testing.assert_array_equal(pooling_matrix(16, 16, mode), np.eye(16))
    np.testing.assert_array_equal(pool_grid(grid, 16, mode), grid)


def test_sincos_2d_encodes_row_and_column():
  from tokenflex_jax.models.projector import sincos_2d
  table = sincos_2d(4, 8)  # [16, 8]: channels 0-3 the row, 4-7 the column
  assert table.shape == (16, 8)
  rows = table.reshape(4, 4, 8)
  np.testing.assert_allclose(rows[:, 0, :4], rows[:, 3, :4])  # row part: same along a row
  np.testing.assert_allclose(rows[0, :, 4:], rows[3, :, 4:])  # column part: down a column
  assert len({tuple(np.round(r, 5)) for r in table}) == 16  # every patch distinct
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_2d(4, 6)


def test_position_embedding_is_added_before_pooling():
  """Pooled tokens carry the mean position of their window: with zero patch features the
  projector's input is exactly the pooled embedding table, at every count."""
  from tokenflex_jax.models import layers
  cfg = ProjectorConfig(position_embedding=True)
  proj = TokenAdaptiveProjector(cfg, out_features=8)
  patches = jnp.zeros((1, 64, 16))
  params = nn.meta.unbox(proj.init(jax.random.key(0), patches, 16)["params"])
  table = np.asarray(params["pos_embedding"])[0]  # [64, 16], initialised to sin-cos
  from tokenflex_jax.models.projector import sincos_2d
  np.testing.assert_allclose(table, sincos_2d(8, 16))
  for n in (4, 16, 64):
    got = proj.apply({"params": params}, patches, n)
    pooled = pool_grid(jnp.asarray(table).reshape(1, 8, 8, 16), int(np.sqrt(n)),
                       "adaptive_avg").reshape(1, n, 16)
    normed = layers.layer_norm(cfg.layer_norm_eps).apply({"params": params["norm"]}, pooled)
    want = layers.SwiGLU(3 * 16, 8).apply({"params": params["mlp"]}, normed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  without = TokenAdaptiveProjector(ProjectorConfig(), 8).init(jax.random.key(0), patches, 16)
  assert "pos_embedding" not in without["params"]


def test_gelu_mlp_is_llava_two_layer():
  proj = TokenAdaptiveProjector(ProjectorConfig(mlp="gelu"), out_features=8)
  x = jax.random.normal(jax.random.key(1), (2, 16, 4))
  params = nn.meta.unbox(proj.init(jax.random.key(0), x, 16)["params"])
  assert set(params["mlp"]) == {"fc1", "fc2"}
  assert params["mlp"]["fc1"]["kernel"].shape == (4, 8)
  assert params["mlp"]["fc2"]["kernel"].shape == (8, 8)
  from tokenflex_jax.models import layers
  h = layers.layer_norm(1e-6).apply({"params": params["norm"]}, x)
  m = params["mlp"]
  want = (jax.nn.gelu(h @ m["fc1"]["kernel"] + m["fc1"]["bias"], approximate=False)
          @ m["fc2"]["kernel"] + m["fc2"]["bias"])
  np.testing.assert_allclose(proj.apply({"params": params}, x, 16), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="mlp"):
    TokenAdaptiveProjector(ProjectorConfig(mlp="relu"), 8).init(jax.random.key(0), x, 16)
