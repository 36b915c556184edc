"""The TokenFLEX vision-language model: ViT -> token-adaptive projector -> LLM.

Each image placeholder token of a text row is replaced by its image's N visual tokens;
text before it stays before, text after it follows them. All shapes are static: a row
has T text slots (padded) and K image slots (images [B, H, W, 3] is K = 1; [B, K, H, W, 3]
holds K), N is a static int, so the merged row has S = T + K (N - 1) slots, whatever its
text: the k-th placeholder takes image k, and a row with fewer placeholders ends in
unused slots, masked out like padding (a text-only row is the LLM alone on its text).
The ViT still runs on unused slots' (zero) images: static shapes make that work wasted,
not skipped.

A packed row holds several conversations (`segments` [B, T]: 1, 2, ... per conversation,
0 on the padding): they never attend to each other, and the rotary position restarts at
0 with each, so every conversation computes what it would alone.

Rotary positions: by default each merged slot advances the position by one, so the
text after an image starts N positions later at every count. With
``visual_position_span = A > 0`` an image's N visual tokens span A positions, so the
text's positions are the same at every count. How they are laid out in that span:
- ``visual_position_layout="raster"``: token i at p + i * A / N. The rows of the image
  land at the same positions at every count, the columns do not (cell (r, c) of an
  n x n grid is at p + A r / n + A c / n^2): each count is its own map of the image.
- ``"grid"``: cell (r, c) at p + A (r + 1/2) / n + sqrt(A) (c + 1/2) / n, i.e. the place
  (y, x) in [0, 1)^2 of the image at p + A y + sqrt(A) x at every count; with A >= n^2
  the order is still row-major.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflex_jax.models import layers
from tokenflex_jax.models.llm import LLM, KVCache, LLMConfig, at_slots
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
                     span: int, layout: str = "raster", segments: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Rotary positions of merged slots. valid, is_visual: [B, S] bool.

  Returns (positions [B, S] float32, the position after the last slot [B]). A padding
  slot does not advance the position; a text slot advances it by one; a visual slot by
  one, or by span / num_tokens when span > 0; with the "grid" layout a visual slot sits
  at its cell's place in its image's span instead (module docstring). With ``segments``
  [B, S] (a packed row's conversation ids, `packed_segments`) the positions restart at
  0 with every conversation, as if each ran alone.
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
  if segments is not None:
    # Each count less its value at the first slot of the slot's conversation (the
    # counts never decrease, so a running maximum carries that value along).
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                              segments[:, 1:] != segments[:, :-1]], axis=1)
    since_start = lambda a: a - jax.lax.cummax(jnp.where(starts, a, 0), axis=1)
    text_before, visual_before = since_start(text_before), since_start(visual_before)
  positions = text_before.astype(jnp.float32) + visual_before * jnp.float32(visual_step)
  end = text_end[:, -1].astype(jnp.float32) + visual_end[:, -1] * jnp.float32(visual_step)
  if span and layout == "grid":
    side = math.isqrt(num_tokens)
    cell = visual_before % num_tokens  # the slot's cell in its own image
    row, col = cell // side, cell % side
    image_start = text_before + (visual_before - cell) * jnp.float32(visual_step)
    place = (span * (row + 0.5) + math.sqrt(span) * (col + 0.5)) / side
    positions = jnp.where(is_visual, image_start + place.astype(jnp.float32), positions)
  return positions, end


@dataclasses.dataclass(frozen=True)
class MergeIndex:
  """Where each merged slot j in [0, S) reads from: is_visual [B, S]; text_index [B, S]
  (clipped to [0, T); a visual slot's is its placeholder); visual_index [B, S] into the row's K * N visual tokens (image k's
  at [k N, (k + 1) N)); past_text [B, S], a slot after the row's last text token;
  text_slot [B, T], the merged slot of each text token (a placeholder: its image's last
  visual slot)."""
  is_visual: jax.Array
  text_index: jax.Array
  visual_index: jax.Array
  past_text: jax.Array
  text_slot: jax.Array


def merge_index(is_image: jax.Array, num_tokens: int, image_slots: int = 1) -> MergeIndex:
  """Index maps for replacing each image placeholder by N visual tokens.

  is_image: [B, T] bool, the placeholders; a row holds at most ``image_slots`` = K of
  them, the k-th taking image slot k. The merged row has S = T + K (N - 1) slots: text
  token t sits at t + (N - 1) * (placeholders before it), so a row with fewer than K
  images ends in unused slots (`past_text`).
  """
  b, t = is_image.shape
  n = num_tokens
  s = t + image_slots * (n - 1)
  j = jnp.arange(s)[None, :, None]                                # [1, S, 1]
  before = jnp.cumsum(is_image, axis=1) - is_image                # placeholders before t
  k = jnp.arange(image_slots)
  # The first merged slot of image k (S when the row has no k-th image): [B, 1, K].
  placeholder = jnp.argmax(is_image[:, :, None] & (before[:, :, None] == k), axis=1)
  present = jnp.any(is_image[:, :, None] & (before[:, :, None] == k), axis=1)
  start = jnp.where(present, placeholder + k * (n - 1), s)[:, None, :]
  inside = (j >= start) & (j < start + n)                         # [B, S, K]
  is_visual = jnp.any(inside, axis=2)
  which = jnp.argmax(inside, axis=2)
  images_before = jnp.sum(j >= start + n, axis=2)
  own_start = jnp.take_along_axis(start[:, 0], which, axis=1)
  # A visual slot's text index is its placeholder (where its conversation id is read).
  text_index = jnp.where(is_visual, own_start - which * (n - 1),
                         j[..., 0] - images_before * (n - 1))
  visual_index = which * n + jnp.clip(j[..., 0] - own_start, 0, n - 1)
  text_slot = jnp.arange(t)[None, :] + (before + is_image) * (n - 1)
  return MergeIndex(is_visual, jnp.clip(text_index, 0, t - 1), visual_index,
                    text_index >= t, text_slot)


def image_slots(images: jax.Array | None, patches: jax.Array | None = None) -> int:
  """K, the image slots per row: images [B, K, H, W, 3] or patches [B, K, L, C]; 1 for
  images [B, H, W, 3] or patches [B, L, C] (``patches`` is read when ``images`` is None)."""
  if images is not None:
    return images.shape[1] if images.ndim == 5 else 1
  return patches.shape[1] if patches.ndim == 4 else 1


def rows_at(x: jax.Array, slots: jax.Array, by_matmul: bool) -> jax.Array:
  """x [B, S, D] at slots [B, Q] -> [B, Q, D]: a gather, or (``by_matmul``) a product
  with the one-hot [B, Q, S], exact (one 1 per row) and without the scatter-add that a
  gather's gradient is, which the TPU compiler lowers slowly (docs/performance.md)."""
  if not by_matmul:
    return at_slots(x, slots)
  one_hot = (slots[..., None] == jnp.arange(x.shape[1])).astype(x.dtype)
  return jnp.einsum("bqs,bsd->bqd", one_hot, x, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=x.dtype)


def merge(visual: jax.Array, text: jax.Array, index: MergeIndex,
          by_matmul: bool = False) -> jax.Array:
  """Interleaves visual [B, K * N, D] and text [B, T, D] embeddings -> [B, S, D]
  (`rows_at` ``by_matmul``)."""
  return jnp.where(index.is_visual[..., None], rows_at(visual, index.visual_index, by_matmul),
                   rows_at(text, index.text_index, by_matmul))


class VLM(nn.Module):
  config: VLMConfig
  # Visual and text embeddings merged, and the text's hidden states picked from the
  # merged row, by one-hot matmuls (True) or gathers (False; `rows_at`): the same values,
  # and the gradients up to the order of their sums. None: matmuls on a TPU target,
  # gathers elsewhere.
  merge_by_matmul: bool | None = None

  def setup(self):
    cfg = self.config
    flags = dict(remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers,
                 attention=cfg.attention)
    self.vit = ViT(cfg.vit, **flags)
    self.projector = TokenAdaptiveProjector(cfg.projector, cfg.llm.width)
    self.llm = LLM(cfg.llm, **flags)

  def patches(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> the ViT's patch features [B, L, C], the same at every count;
    [B, K, H, W, 3] (K image slots per row) -> [B, K, L, C]."""
    if images.ndim == 5:
      b, k = images.shape[:2]
      out = self.vit(images.reshape((b * k,) + images.shape[2:]))
      return out.reshape((b, k) + out.shape[1:])
    return self.vit(images)

  def encode_images(self, images: jax.Array, num_tokens: int,
                    patches: jax.Array | None = None) -> jax.Array:
    """[B, H, W, 3] or [B, K, H, W, 3] (or their ``patches`` [B, (K,) L, C]) -> visual
    tokens [B, K * num_tokens, D], image k's at [k N, (k + 1) N)."""
    patches = self.patches(images) if patches is None else patches
    if patches.ndim == 4:
      b, k = patches.shape[:2]
      out = self.projector(patches.reshape((b * k,) + patches.shape[2:]), num_tokens)
      return out.reshape((b, k * num_tokens) + out.shape[2:])
    return self.projector(patches, num_tokens)

  def _embed_inputs(self, images, tokens, num_tokens, patches=None, segments=None):
    """Merged embeddings [B, S, D], key validity [B, S], positions [B, S], end [B], the
    index, and the merged conversation ids [B, S] (None without ``segments``).
    Unused image slots and the slots past the text are not valid (module docstring)."""
    cfg = self.config
    slots = image_slots(images, patches)
    is_image = tokens == cfg.image_token_id
    index = merge_index(is_image, num_tokens, slots)
    x = merge(self.encode_images(images, num_tokens, patches), self.llm.embed(tokens), index,
              layers.on_tpu_by_default(self.merge_by_matmul))
    text_valid = tokens != cfg.pad_token_id
    valid = index.is_visual | (~index.past_text & jnp.take_along_axis(
        text_valid, index.text_index, axis=1))
    merged_segments = None
    if segments is not None:
      # Every slot before the row's end keeps its conversation (a visual one its
      # placeholder's), valid or not: a pad id spelled inside a text is no key, but no
      # boundary either, and its query sees its own conversation as it would alone.
      merged_segments = jnp.where(index.past_text, 0,
                                  jnp.take_along_axis(segments, index.text_index, 1))
    positions, end = merged_positions(valid, index.is_visual, num_tokens,
                                      cfg.visual_position_span, cfg.visual_position_layout,
                                      merged_segments)
    return x, valid, positions, end, index, merged_segments

  def __call__(self, images: jax.Array, tokens: jax.Array, num_tokens: int,
               segments: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits aligned with the text.

    Args:
      images: [B, H, W, 3] float in [-1, 1], one image slot per row; or [B, K, H, W, 3],
        K slots (a row's k-th placeholder takes slot k; unused slots are not read).
      tokens: [B, T] int, right-padded; per row at most K image placeholders (none: a
        text-only row).
      num_tokens: visual token count N per image (a static square int).
      segments: [B, T] int, which conversation of a packed row each token belongs to
        (1, 2, ...; 0 on the padding), or None: one conversation per row. Conversations
        never attend to each other and each starts at position 0.
    Returns:
      [B, T, V] float32, where [:, t] is the prediction of tokens[:, t] from
      everything before it in its conversation (the first token of a conversation and
      the placeholders are meaningless).
    """
    return self.llm.logits(self.text_hidden(images, tokens, num_tokens, segments=segments))

  def text_hidden(self, images: jax.Array | None, tokens: jax.Array, num_tokens: int,
                  patches: jax.Array | None = None, segments: jax.Array | None = None
                  ) -> jax.Array:
    """The final hidden states [B, T, D] behind `__call__`'s logits (the same alignment
    and arguments): the loss projects them onto the vocabulary a chunk at a time. With
    ``patches`` [B, (K,) L, C] (`patches` of the images) the ViT is not run (``images``
    may be None)."""
    x, valid, positions, _, index, merged_segments = self._embed_inputs(
        images, tokens, num_tokens, patches, segments)
    hidden, _ = self.llm.decode(x, positions, valid, segment_ids=merged_segments)
    predictor = jnp.maximum(index.text_slot - 1, 0)
    return rows_at(hidden, predictor, layers.on_tpu_by_default(self.merge_by_matmul))

  def output_head(self) -> jax.Array:
    """The LLM's output projection [D, V] (compute dtype): logits = hidden @ it."""
    return self.llm.output_head()

  def prefill(self, images: jax.Array | None, tokens: jax.Array, num_tokens: int,
              cache: KVCache, patches: jax.Array | None = None
              ) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
    """Runs a left-padded prompt through the model, filling the cache from slot 0.

    Args:
      images: [B, H, W, 3] or [B, K, H, W, 3], or None when ``patches`` [B, (K,) L, C]
      (from `patches`) are given, so that several counts share one ViT pass; tokens:
      [B, P] left-padded prompts ending where the answer starts, each holding one image
      placeholder per image it shows (at most K); num_tokens: N; cache: a `KVCache` with
      T_max >= P + K (N - 1) slots.
    Returns:
      (logits of the next token [B, V], cache, key_valid [B, T_max], next position [B]).
    """
    x, valid, positions, end, index, _ = self._embed_inputs(images, tokens, num_tokens,
                                                            patches)
    t_max = cache["k"].shape[2]
    key_valid = jnp.concatenate(
        [valid, jnp.ones((valid.shape[0], t_max - valid.shape[1]), bool)], axis=1)
    # Only the prompt's last token needs its state (image slots a prompt leaves unused
    # come after it).
    last, cache = self.llm.decode(x, positions, key_valid, cache, 0,
                                  output_slots=index.text_slot[:, -1:])
    return self.llm.logits(last)[:, 0], cache, key_valid, end

  def decode_step(self, token: jax.Array, position: jax.Array, cache: KVCache,
                  key_valid: jax.Array, cache_index: jax.Array
                  ) -> tuple[jax.Array, KVCache]:
    """One generation step. token, position: [B] -> (next-token logits [B, V], cache)."""
    x = self.llm.embed(token[:, None])
    hidden, cache = self.llm.decode(x, position[:, None], key_valid, cache, cache_index)
    return self.llm.logits(hidden)[:, 0], cache
