"""The token-adaptive projector: pool the patch grid to n x n, then LayerNorm + SwiGLU.

One set of weights serves every token count; the count is a static Python int, so
each count is its own compiled program.

Options (each changes the parameter tree, so a checkpoint records them in its config):
- ``position_embedding``: a learned embedding per patch of the ViT grid, initialised to a
  2-D sine-cosine table, added to the patch features before pooling. Pooling is linear,
  so each token then carries the mean position of the patches it averages: the same
  place in the image reads the same at every count. A pretrained SigLIP's features carry
  their position; a small ViT pre-trained on position-free labels loses it
  (docs/results.md measures both).
- ``mlp``: "swiglu" (TokenFLEX) or "gelu" (LLaVA-1.5's two-layer GELU MLP, the ablation).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax.models import layers

POOLING_MODES = ("adaptive_avg", "resize_avg")
MLP_KINDS = ("swiglu", "gelu")


def adaptive_avg_matrix(size: int, side: int) -> np.ndarray:
  """[side, size] averaging weights of torch's ``adaptive_avg_pool`` along one axis.

  Window i covers [floor(i * size / side), ceil((i + 1) * size / side)).
  """
  m = np.zeros((side, size), np.float64)
  for i in range(side):
    start = (i * size) // side
    end = -((-(i + 1) * size) // side)
    m[i, start:end] = 1.0 / (end - start)
  return m


def bilinear_align_corners_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] weights of a 1-D bilinear resize with ``align_corners=True``."""
  m = np.zeros((out, size), np.float64)
  for o in range(out):
    src = 0.0 if out == 1 else o * (size - 1) / (out - 1)
    lo = min(int(math.floor(src)), size - 1)
    hi = min(lo + 1, size - 1)
    frac = src - lo
    m[o, lo] += 1.0 - frac
    m[o, hi] += frac
  return m


def resize_avg_matrix(size: int, side: int) -> np.ndarray:
  """[side, size]: bilinear (align_corners) resize to ceil(size/side)*side, then avg-pool."""
  target = -(-size // side) * side
  resize = np.eye(size) if target == size else bilinear_align_corners_matrix(size, target)
  k = target // side
  pool = np.kron(np.eye(side), np.full((1, k), 1.0 / k))
  return pool @ resize


def pooling_matrix(size: int, side: int, mode: str) -> np.ndarray:
  """The separable [side, size] pooling weights of ``mode`` along one grid axis."""
  if mode == "adaptive_avg":
    return adaptive_avg_matrix(size, side)
  if mode == "resize_avg":
    return resize_avg_matrix(size, side)
  raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def pool_grid(grid: jax.Array, side: int, mode: str) -> jax.Array:
  """Pools a patch grid to ``side x side``.

  Both modes are separable linear maps, applied as two small matmuls.

  Args:
    grid: [B, H, W, C] patch features.
    side: output side n (static int >= 1).
    mode: "adaptive_avg" (torch adaptive_avg_pool2d: uneven windows) or "resize_avg"
      (bilinear align_corners=True resize up to a multiple of n, then n x n average
      pooling with kernel = stride).
  Returns:
    [B, side, side, C].
  """
  if side < 1:
    raise ValueError(f"pool side must be >= 1, got {side}")
  _, h, w, _ = grid.shape
  mh = jnp.asarray(pooling_matrix(h, side, mode), grid.dtype)
  mw = mh if w == h else jnp.asarray(pooling_matrix(w, side, mode), grid.dtype)
  out = jnp.einsum("ih,bhwc->biwc", mh, grid)
  return jnp.einsum("jw,biwc->bijc", mw, out)


def token_side(num_tokens: int) -> int:
  """n such that n * n == num_tokens; raises ValueError otherwise."""
  side = math.isqrt(num_tokens)
  if num_tokens < 1 or side * side != num_tokens:
    raise ValueError(f"num_visual_tokens={num_tokens} is not a positive square (e.g. 64, 144, 256)")
  return side


def sincos_2d(side: int, width: int) -> np.ndarray:
  """[side * side, width] 2-D sine-cosine table (MAE's): half the channels encode the
  row, half the column, each as sin/cos pairs over geometric frequencies."""
  if width % 4:
    raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, got {width}")
  freqs = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4))  # [W/4]
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  def encode(pos):  # [side*side] -> [side*side, W/2]
    angle = pos.reshape(-1, 1) * freqs[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
  return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  pooling: str = "adaptive_avg"
  mlp: str = "swiglu"
  mlp_ratio: int = 3  # SwiGLU hidden width = mlp_ratio x the ViT width
  position_embedding: bool = False
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"


class GeluMLP(nn.Module):
  """LLaVA-1.5's projector MLP: gelu(x W1 + b1) W2 + b2, both of width out_features."""
  out_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.out_features, ("embed", "mlp"), use_bias=True, dtype=self.dtype,
                     name="fc1")(x)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=False), ("batch", "length", "mlp"))
    return layers.dense(self.out_features, ("mlp", "embed"), use_bias=True, dtype=self.dtype,
                        name="fc2")(h)


class TokenAdaptiveProjector(nn.Module):
  """Patch features [B, L, C] -> visual tokens [B, num_tokens, out_features]."""
  config: ProjectorConfig
  out_features: int

  @nn.compact
  def __call__(self, patches: jax.Array, num_tokens: int) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, length, c = patches.shape
    s = math.isqrt(length)
    if s * s != length:
      raise ValueError(f"patch sequence length {length} is not a square grid")
    n = token_side(num_tokens)
    if cfg.position_embedding:
      table = sincos_2d(s, c)
      posemb = self.param("pos_embedding", nn.with_logical_partitioning(
          lambda *_: jnp.asarray(table)[None], (None, None, "embed")), (1, length, c))
      patches = patches + posemb.astype(patches.dtype)
    x = pool_grid(patches.reshape(b, s, s, c), n, cfg.pooling).reshape(b, n * n, c)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = layers.layer_norm(cfg.layer_norm_eps, dtype, name="norm")(x)
    if cfg.mlp == "swiglu":
      x = layers.SwiGLU(cfg.mlp_ratio * c, self.out_features, dtype=dtype, name="mlp")(x)
    elif cfg.mlp == "gelu":
      x = GeluMLP(self.out_features, dtype=dtype, name="mlp")(x)
    else:
      raise ValueError(f"unknown projector mlp {cfg.mlp!r}; expected one of {MLP_KINDS}")
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
