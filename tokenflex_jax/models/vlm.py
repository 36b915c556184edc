"""The TokenFLEX vision-language model: ViT -> token-adaptive projector -> LLM.

The visual tokens replace the single image placeholder token of each text
sequence; text before it stays before, text after it follows the N visual tokens.
All shapes are static: text is padded to a fixed length T, N is a static int, so
the merged sequence has length S = T - 1 + N. A row without a placeholder (a text-only
row, at most T - 1 tokens long) takes its N visual slots after its text, in place of
its last (padding) slot, and they are masked out: no text attends to them and they do
not advance the rotary position, so the row is the LLM alone on its text. The ViT still
runs on that row's (zero) image: static shapes make its work wasted, not skipped.

Rotary positions: by default each merged slot advances the position by one, so the
text after the image starts N positions later at every count. With
``visual_position_span = K > 0`` the N visual tokens span K positions, so the text's
positions are the same at every count. How they are laid out in that span:
- ``visual_position_layout="raster"``: token i at p + i * K / N. The rows of the image
  land at the same positions at every count, the columns do not (cell (r, c) of an
  n x n grid is at p + K r / n + K c / n^2): each count is its own map of the image.
- ``"grid"``: cell (r, c) at p + K (r + 1/2) / n + sqrt(K) (c + 1/2) / n, i.e. the place
  (y, x) in [0, 1)^2 of the image at p + K y + sqrt(K) x at every count; with K >= n^2
  the order is still row-major.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflex_jax.models.llm import LLM, KVCache, LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig, TokenAdaptiveProjector
from tokenflex_jax.models.vit import ViT, ViTConfig


VISUAL_POSITION_LAYOUTS = ("raster", "grid")
# The VLM's top-level parameter modules (`VLM.setup`), from the input on: one
# config.lr_multipliers entry each.
MODULES = ("vit", "projector", "llm")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  vit: ViTConfig
  projector: ProjectorConfig
  llm: LLMConfig
  image_token_id: int
  pad_token_id: int = 0
  visual_position_span: int = 0  # 0: one position per visual token; K: N tokens span K
  visual_position_layout: str = "raster"  # with a span: "raster" or "grid" (see above)
  # Performance flags for the ViT blocks and the LLM layers (the parameters are the same
  # whatever they say): `layers.REMAT_POLICIES`, a rolled loop or an unrolled one, and
  # the attention implementation.
  remat_policy: str = "none"
  scan_layers: bool = True
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`, ViT and LLM


def merged_positions(valid: jax.Array, is_visual: jax.Array, num_tokens: int,
                     span: int, layout: str = "raster") -> tuple[jax.Array, jax.Array]:
  """Rotary positions of merged slots. valid, is_visual: [B, S] bool.

  Returns (positions [B, S] float32, the position after the last slot [B]). A padding
  slot does not advance the position; a text slot advances it by one; a visual slot by
  one, or by span / num_tokens when span > 0; with the "grid" layout a visual slot sits
  at its cell's place in the span instead (module docstring).
  """
  if layout not in VISUAL_POSITION_LAYOUTS:
    raise ValueError(f"visual_position_layout must be one of {VISUAL_POSITION_LAYOUTS}, "
                     f"got {layout!r}")
  visual_step = span / num_tokens if span else 1.0
  # Counted in integers, scaled once: exact, where a float cumsum would drift.
  text_end = jnp.cumsum(valid & ~is_visual, axis=1)
  visual_end = jnp.cumsum(valid & is_visual, axis=1)
  text_before = text_end - (valid & ~is_visual)
  visual_before = visual_end - (valid & is_visual)
  positions = text_before.astype(jnp.float32) + visual_before * jnp.float32(visual_step)
  end = text_end[:, -1].astype(jnp.float32) + visual_end[:, -1] * jnp.float32(visual_step)
  if span and layout == "grid":
    side = math.isqrt(num_tokens)
    row, col = visual_before // side, visual_before % side
    place = (span * (row + 0.5) + math.sqrt(span) * (col + 0.5)) / side
    positions = jnp.where(is_visual, text_before + place.astype(jnp.float32), positions)
  return positions, end


def image_positions(tokens: jax.Array, image_token_id: int) -> tuple[jax.Array, jax.Array]:
  """tokens [B, T] -> (image_pos [B] int32, has_image [B] bool): the placeholder's index,
  or T - 1 for a row without one (module docstring)."""
  is_image = tokens == image_token_id
  has_image = jnp.any(is_image, axis=1)
  image_pos = jnp.where(has_image, jnp.argmax(is_image, axis=1), tokens.shape[1] - 1)
  return image_pos.astype(jnp.int32), has_image


@dataclasses.dataclass(frozen=True)
class MergeIndex:
  """Where each merged slot j in [0, S) reads from: is_visual, text_index, visual_index
  [B, S]; image_pos [B], the slot of each row's first visual token."""
  is_visual: jax.Array
  text_index: jax.Array
  visual_index: jax.Array
  image_pos: jax.Array


def merge_index(image_pos: jax.Array, text_length: int, num_tokens: int) -> MergeIndex:
  """Index maps for inserting N visual tokens at each row's placeholder. image_pos: [B]."""
  j = jnp.arange(text_length - 1 + num_tokens)[None, :]
  p = image_pos[:, None]
  is_visual = (j >= p) & (j < p + num_tokens)
  text_index = jnp.clip(jnp.where(j < p, j, j - num_tokens + 1), 0, text_length - 1)
  visual_index = jnp.clip(j - p, 0, num_tokens - 1)
  return MergeIndex(is_visual, text_index, visual_index, image_pos)


def merge(visual: jax.Array, text: jax.Array, index: MergeIndex) -> jax.Array:
  """Interleaves visual [B, N, D] and text [B, T, D] embeddings -> [B, S, D]."""
  take = lambda a, i: jnp.take_along_axis(a, i[..., None], axis=1)
  return jnp.where(index.is_visual[..., None], take(visual, index.visual_index),
                   take(text, index.text_index))


class VLM(nn.Module):
  config: VLMConfig

  def setup(self):
    cfg = self.config
    flags = dict(remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers,
                 attention=cfg.attention)
    self.vit = ViT(cfg.vit, **flags)
    self.projector = TokenAdaptiveProjector(cfg.projector, cfg.llm.width)
    self.llm = LLM(cfg.llm, **flags)

  def patches(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> the ViT's patch features [B, L, C], the same at every count."""
    return self.vit(images)

  def encode_images(self, images: jax.Array, num_tokens: int,
                    patches: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] (or their ``patches`` [B, L, C]) -> visual tokens [B, num_tokens, D]."""
    return self.projector(self.vit(images) if patches is None else patches, num_tokens)

  def _embed_inputs(self, images, tokens, num_tokens, patches=None):
    """Merged embeddings [B, S, D], key validity [B, S], positions [B, S], end [B], index.
    A text-only row's visual slots are not valid (module docstring)."""
    image_pos, has_image = image_positions(tokens, self.config.image_token_id)
    index = merge_index(image_pos, tokens.shape[1], num_tokens)
    x = merge(self.encode_images(images, num_tokens, patches), self.llm.embed(tokens), index)
    text_valid = tokens != self.config.pad_token_id
    valid = jnp.where(index.is_visual, has_image[:, None],
                      jnp.take_along_axis(text_valid, index.text_index, axis=1))
    positions, end = merged_positions(valid, index.is_visual, num_tokens,
                                      self.config.visual_position_span,
                                      self.config.visual_position_layout)
    return x, valid, positions, end, index

  def __call__(self, images: jax.Array, tokens: jax.Array, num_tokens: int) -> jax.Array:
    """Teacher-forced logits aligned with the text.

    Args:
      images: [B, H, W, 3] float in [-1, 1].
      tokens: [B, T] int, right-padded, one image placeholder per row (or none: a
        text-only row, at most T - 1 tokens; its image is not read).
      num_tokens: visual token count N (a static square int).
    Returns:
      [B, T, V] float32, where [:, t] is the prediction of tokens[:, t] from
      everything before it (row 0 and positions up to the placeholder are meaningless;
      in a text-only row, the last position).
    """
    return self.llm.logits(self.text_hidden(images, tokens, num_tokens))

  def text_hidden(self, images: jax.Array | None, tokens: jax.Array, num_tokens: int,
                  patches: jax.Array | None = None) -> jax.Array:
    """The final hidden states [B, T, D] behind `__call__`'s logits (the same alignment):
    the loss projects them onto the vocabulary a chunk at a time. With ``patches``
    [B, L, C] (`patches` of the images) the ViT is not run (``images`` may be None)."""
    x, valid, positions, _, index = self._embed_inputs(images, tokens, num_tokens, patches)
    hidden, _ = self.llm.decode(x, positions, valid)
    t = jnp.arange(tokens.shape[1])[None, :]
    merged_t = jnp.where(t < index.image_pos[:, None], t, t + num_tokens - 1)
    predictor = jnp.maximum(merged_t - 1, 0)
    return jnp.take_along_axis(hidden, predictor[..., None], axis=1)

  def output_head(self) -> jax.Array:
    """The LLM's output projection [D, V] (compute dtype): logits = hidden @ it."""
    return self.llm.output_head()

  def prefill(self, images: jax.Array | None, tokens: jax.Array, num_tokens: int,
              cache: KVCache, patches: jax.Array | None = None
              ) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """Runs a left-padded prompt through the model, filling the cache from slot 0.

    Args:
      images: [B, H, W, 3], or None when ``patches`` [B, L, C] (from `patches`) are
      given, so that several counts share one ViT pass; tokens: [B, P] left-padded
      prompts ending where the answer starts, each holding the image placeholder (a
      text-only prompt would lose its last token to the visual slots); num_tokens: N;
      cache: a `KVCache` with
      T_max >= P - 1 + N slots.
    Returns:
      (logits of the next token [B, V], cache, key_valid [B, T_max], next position [B]).
    """
    x, valid, positions, end, _ = self._embed_inputs(images, tokens, num_tokens, patches)
    t_max = cache["k"].shape[2]
    key_valid = jnp.concatenate(
        [valid, jnp.ones((valid.shape[0], t_max - valid.shape[1]), bool)], axis=1)
    hidden, cache = self.llm.decode(x, positions, key_valid, cache, 0)
    logits = self.llm.logits(hidden[:, -1:])[:, 0]
    return logits, cache, key_valid, end

  def decode_step(self, token: jax.Array, position: jax.Array, cache: KVCache,
                  key_valid: jax.Array, cache_index: jax.Array
                  ) -> tuple[jax.Array, KVCache]:
    """One generation step. token, position: [B] -> (next-token logits [B, V], cache)."""
    x = self.llm.embed(token[:, None])
    hidden, cache = self.llm.decode(x, position[:, None], key_valid, cache, cache_index)
    return self.llm.logits(hidden)[:, 0], cache
