"""SigLIP-style vision transformer returning the patch grid (no pooling head)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax.models import layers, splash


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 32
  patch_size: int = 2
  width: int = 64
  depth: int = 2
  mlp_dim: int = 256
  num_heads: int = 2
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"

  @property
  def grid_side(self) -> int:
    return self.image_size // self.patch_size


def interpolate_posemb(posemb: jax.Array, side: int) -> jax.Array:
  """Bilinearly resizes a square position embedding. [1, s*s, C] -> [1, side*side, C]."""
  old = int(np.sqrt(posemb.shape[1]))
  if old == side:
    return posemb
  grid = posemb.reshape(1, old, old, -1)
  grid = jax.image.resize(grid, (1, side, side, grid.shape[-1]), method="bilinear")
  return grid.reshape(1, side * side, -1)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + MHA(LN(x)); x + MLP(LN(x)).

  [B, L, C] -> ([B, L, C], None): the (carry, output) of one step of a layer stack.
  """
  config: ViTConfig
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    head_dim = cfg.width // cfg.num_heads
    y = layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_attn")(x)
    q, k, v = (layers.dense((cfg.num_heads, head_dim), ("embed", "heads", "head_dim"),
                            use_bias=True, dtype=dtype, name=n)(y) for n in ("q", "k", "v"))
    if layers.resolve_attention(self.attention, q.dtype) == "splash":
      y = splash.splash_attention(q, k, v, key_valid=None, causal=False)
    else:
      y = layers.grouped_attention(q, k, v, mask=None, implementation=self.attention)
    y = layers.dense(cfg.width, ("heads", "head_dim", "embed"), num_contract=2, use_bias=True,
                     dtype=dtype, name="out")(y)
    x = x + y
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_mlp")(x)
    y = layers.dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, name="fc1")(y)
    y = nn.gelu(y, approximate=True)
    y = layers.dense(cfg.width, ("mlp", "embed"), use_bias=True, dtype=dtype, name="fc2")(y)
    x = x + y
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class ViT(nn.Module):
  """Images [B, H, W, 3] in [-1, 1] -> patch features [B, L, C], L = (H//p) * (W//p)."""
  config: ViTConfig
  # Performance flags; the parameter tree is the same whatever they say (the blocks'
  # weights are stacked under "blocks", [depth, ...]): what the backward pass keeps of
  # each block (`layers.REMAT_POLICIES`), and a rolled loop over the blocks (True) or
  # an unrolled one.
  remat_policy: str = "none"
  scan_layers: bool = True
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.patch_size
    if images.shape[1] != images.shape[2] or images.shape[1] < p:
      raise ValueError(f"images of shape {images.shape} are not square, or smaller than "
                       f"patch_size={p}")
    # Like SigLIP's VALID convolution, a remainder smaller than a patch is dropped
    # (384 px / 14 -> a 27 x 27 grid).
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                kernel_init=nn.with_logical_partitioning(
                    layers.default_kernel_init, (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name="patch_embed")(images.astype(dtype))
    b, gh, gw, c = x.shape
    x = x.reshape(b, gh * gw, c)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                        (1, cfg.grid_side ** 2, cfg.width))
    x = x + interpolate_posemb(posemb, gh).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    blocks = layers.stacked(EncoderBlock, cfg.depth, remat_policy=self.remat_policy,
                            scan=self.scan_layers)
    x, _ = blocks(cfg, self.attention, name="blocks")(x)
    return layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_final")(x)
