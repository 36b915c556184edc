"""SigLIP-style vision transformer returning the patch grid (no pooling head)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from tokenflex_jax.models import layers, splash


# What `ViT` pads its patch sequence to a multiple of, where it pads (``pad_length``):
# the TPU compiler's bfloat16 tiles, or splash's blocks where the blocks run splash.
LENGTH_MULTIPLE = 16
SPLASH_LENGTH_MULTIPLE = splash.LANES


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

  ([B, L, C], key_valid [B, L] bool or None) -> ([B, L, C], None): the (carry, output)
  of one step of a layer stack; slots whose ``key_valid`` is False are never attended to.
  """
  config: ViTConfig
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  @nn.compact
  def __call__(self, x: jax.Array, key_valid: jax.Array | None = None
               ) -> tuple[jax.Array, None]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    head_dim = cfg.width // cfg.num_heads
    y = layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_attn")(x)
    q, k, v = (checkpoint_name(
        layers.dense((cfg.num_heads, head_dim), ("embed", "heads", "head_dim"),
                     use_bias=True, dtype=dtype, name=n)(y), layers.ATTENTION_PROJECTIONS)
               for n in ("q", "k", "v"))
    if layers.resolve_attention(self.attention, q.dtype) == "splash":
      y = splash.splash_attention(q, k, v, key_valid=key_valid, causal=False)
    else:
      mask = None if key_valid is None else jnp.broadcast_to(
          key_valid[:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
      y = layers.grouped_attention(q, k, v, mask=mask, implementation=self.attention)
    y = layers.dense(cfg.width, ("heads", "head_dim", "embed"), num_contract=2, use_bias=True,
                     dtype=dtype, name="out")(y)
    x = x + checkpoint_name(y, layers.ATTENTION_PROJECTIONS)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_mlp")(x)
    y = layers.dense(cfg.mlp_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, name="fc1")(y)
    y = nn.gelu(y, approximate=True)
    y = layers.dense(cfg.width, ("mlp", "embed"), use_bias=True, dtype=dtype, name="fc2")(y)
    x = x + y
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class PatchEmbed(nn.Module):
  """SigLIP's patch embedding, a VALID convolution of stride ``patch_size``, as one
  matmul over the flattened patches (its gradient is a matmul too, where the TPU
  compiler lowers a convolution's gradient to a kernel slow to compile:
  docs/performance.md). Images [B, H, W, c] -> [B, H//p, W//p, width]; a remainder
  smaller than a patch is dropped (384 px / 14 -> a 27 x 27 grid). The parameters are
  `nn.Conv`'s: kernel [p, p, c, width], bias [width]."""
  width: int
  patch_size: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, c = images.shape
    gh, gw = h // p, w // p
    kernel = self.param("kernel", nn.with_logical_partitioning(
        layers.default_kernel_init, (None, None, None, "embed")), (p, p, c, self.width))
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (self.width,))
    patches = images[:, :gh * p, :gw * p].astype(self.dtype).reshape(b, gh, p, gw, p, c)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype))
    return x + bias.astype(self.dtype)


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
  # The blocks run on the patch sequence padded to a multiple of `LENGTH_MULTIPLE`
  # slots (`SPLASH_LENGTH_MULTIPLE` with splash attention, which would pad to its blocks
  # otherwise), masked as keys and dropped after the last block (True), or on the
  # sequence as it is (False). None: padded on a TPU target, where the compiler tiles a
  # sequence by 8 (16 in bfloat16) and reshapes of any other length become copies:
  # SigLIP's 729 patches become 768 with splash, 736 without (docs/performance.md). The
  # outputs at the patches are the same up to rounding.
  pad_length: bool | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p = cfg.patch_size
    if images.shape[1] != images.shape[2] or images.shape[1] < p:
      raise ValueError(f"images of shape {images.shape} are not square, or smaller than "
                       f"patch_size={p}")
    x = PatchEmbed(cfg.width, p, dtype, name="patch_embed")(images)
    b, gh, gw, c = x.shape
    x = x.reshape(b, gh * gw, c)
    posemb = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                        (1, cfg.grid_side ** 2, cfg.width))
    x = x + interpolate_posemb(posemb, gh).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    blocks = layers.stacked(EncoderBlock, cfg.depth, remat_policy=self.remat_policy,
                            scan=self.scan_layers, in_axes=(nn.broadcast,))
    length = x.shape[1]
    multiple = (SPLASH_LENGTH_MULTIPLE if layers.resolve_attention(self.attention, dtype)
                == "splash" else LENGTH_MULTIPLE)
    padded = (-(-length // multiple) * multiple
              if layers.on_tpu_by_default(self.pad_length) else length)
    key_valid = None
    if padded != length:
      x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
      key_valid = jnp.broadcast_to(jnp.arange(padded) < length, (b, padded))
    x, _ = blocks(cfg, self.attention, name="blocks")(x, key_valid)
    x = x[:, :length]
    return layers.layer_norm(cfg.layer_norm_eps, dtype, name="ln_final")(x)
