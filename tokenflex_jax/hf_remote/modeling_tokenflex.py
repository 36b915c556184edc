"""An exported TokenFLEX model on transformers' own modules: `SiglipVisionModel`, the
token-adaptive projector, and `Qwen2ForCausalLM` / `LlamaForCausalLM`.

The number of visual tokens N is chosen per call. A prompt holds N copies of the image
token per image (the processor writes them: ``processor(text, images,
num_visual_tokens=N)``), or one per image with ``generate(..., num_visual_tokens=N)``,
which expands them. The ViT's patch grid is pooled to sqrt(N) x sqrt(N), normalised and
projected into the decoder (LayerNorm + SwiGLU), and those N tokens replace the image
tokens. Rotary positions are tokenflex_jax's: padding does not advance them, each token
advances them by one (with ``visual_position_span`` an image's N tokens span that many
positions). Tensor names follow Ristretto's (``vision_model.``, ``projector.mlp.``,
``language_model.``); its projector has biases, this one has none.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tokenflex import TokenFlexConfig


class FFN(nn.Module):
  """LayerNorm, then SwiGLU ``g(silu(f1 x) * f2 x)`` without biases (Ristretto's names;
  its linears have biases) or LLaVA-1.5's ``fc2(gelu(fc1 x))`` with biases."""

  def __init__(self, config: TokenFlexConfig):
    super().__init__()
    width, out = config.vision_config.hidden_size, config.llm_config.hidden_size
    self.kind = config.projector_mlp
    self.layernorm = nn.LayerNorm(width, eps=config.projector_layer_norm_eps)
    if self.kind == "swiglu":
      hidden = config.projector_mlp_ratio * width
      self.f1 = nn.Linear(width, hidden, bias=False)
      self.f2 = nn.Linear(width, hidden, bias=False)
      self.g = nn.Linear(hidden, out, bias=False)
    elif self.kind == "gelu":
      self.fc1 = nn.Linear(width, out)
      self.fc2 = nn.Linear(out, out)
    else:
      raise ValueError(f"projector_mlp={self.kind!r}: expected 'swiglu' or 'gelu'")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.layernorm(x)
    if self.kind == "swiglu":
      return self.g(F.silu(self.f1(x)) * self.f2(x))
    return self.fc2(F.gelu(self.fc1(x)))


class TokenAdaptiveProjector(nn.Module):
  """Patch features [I, L, C] -> [I, N, D] for any square N: (position table), pool the
  sqrt(L) x sqrt(L) grid to sqrt(N) x sqrt(N), then `FFN`."""

  def __init__(self, config: TokenFlexConfig):
    super().__init__()
    vision = config.vision_config
    self.pooling = config.pooling
    if self.pooling not in ("adaptive_avg", "resize_avg"):
      raise ValueError(f"pooling={self.pooling!r}: expected 'adaptive_avg' or 'resize_avg'")
    if config.projector_position_embedding:  # its values come with the weights
      side = vision.image_size // vision.patch_size
      self.pos_embedding = nn.Parameter(torch.zeros(1, side * side, vision.hidden_size))
    else:
      self.pos_embedding = None
    self.mlp = FFN(config)

  def pool(self, grid: torch.Tensor, side: int) -> torch.Tensor:
    """[I, C, H, W] -> [I, C, side, side]."""
    if self.pooling == "adaptive_avg":
      return F.adaptive_avg_pool2d(grid, side)
    size = grid.shape[-1]
    target = -(-size // side) * side
    if target != size:
      grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=True)
    return F.avg_pool2d(grid, target // side)

  def forward(self, patches: torch.Tensor, num_tokens: int) -> torch.Tensor:
    i, length, c = patches.shape
    s, n = math.isqrt(length), math.isqrt(num_tokens)
    if n * n != num_tokens:
      raise ValueError(f"num_visual_tokens={num_tokens} is not a square (e.g. 64, 144, 256)")
    if self.pos_embedding is not None:
      patches = patches + self.pos_embedding.to(patches.dtype)
    grid = patches.transpose(1, 2).reshape(i, c, s, s)
    return self.mlp(self.pool(grid, n).flatten(2).transpose(1, 2))


def rotary_positions(is_image: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int,
                     span: int, layout: str) -> torch.Tensor:
  """Positions [B, S] (float32) of a left- or right-padded row: padding does not advance
  the position, text advances it by one, a visual token by one or (span > 0) by
  span / N; with the "grid" layout a visual token sits at its cell's place in its
  image's span (tokenflex_jax.models.vlm.merged_positions)."""
  valid = attention_mask.bool()
  visual, text = valid & is_image, valid & ~is_image
  text_before = text.long().cumsum(1) - text.long()
  visual_before = visual.long().cumsum(1) - visual.long()
  step = span / num_tokens if span else 1.0
  positions = text_before.float() + visual_before.float() * step
  if span and layout == "grid":
    side = math.isqrt(num_tokens)
    cell = visual_before % num_tokens
    row, col = cell // side, cell % side
    start = text_before.float() + (visual_before - cell).float() * step
    place = (span * (row + 0.5) + math.sqrt(span) * (col + 0.5)) / side
    positions = torch.where(visual, start + place.float(), positions)
  return positions


class TokenFlexForConditionalGeneration(PreTrainedModel, GenerationMixin):
  config_class = TokenFlexConfig
  base_model_prefix = ""
  main_input_name = "input_ids"
  _no_split_modules = ["SiglipEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]
  _supports_sdpa = True

  def __init__(self, config: TokenFlexConfig):
    super().__init__(config)
    self.vision_model = SiglipVisionModel(config.vision_config)
    self.projector = TokenAdaptiveProjector(config)
    self.language_model = AutoModelForCausalLM.from_config(config.llm_config)
    self.post_init()

  def get_input_embeddings(self) -> nn.Module:
    return self.language_model.get_input_embeddings()

  def get_output_embeddings(self) -> nn.Module:
    return self.language_model.get_output_embeddings()

  def visual_tokens(self, pixel_values: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """pixel_values [I, 3, H, W] in [-1, 1] -> [I, N, D]."""
    out = self.vision_model(pixel_values=pixel_values,
                            output_hidden_states=self.config.select_layer != -1)
    patches = (out.last_hidden_state if self.config.select_layer == -1
               else out.hidden_states[self.config.select_layer])
    return self.projector(patches, num_tokens)

  def tokens_per_image(self, input_ids: torch.Tensor, num_images: int) -> int:
    """N: the image tokens in ``input_ids`` over the images."""
    count = int((input_ids == self.config.image_token_id).sum())
    if num_images == 0 or count == 0 or count % num_images:
      raise ValueError(f"{count} image tokens for {num_images} images: each image needs "
                       "the same number N of image tokens")
    return count // num_images

  def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                num_tokens: int) -> torch.Tensor:
    """Rotary positions [B, S] of whole prompts (`rotary_positions`)."""
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    return rotary_positions(input_ids == self.config.image_token_id, attention_mask,
                            num_tokens, self.config.visual_position_span,
                            self.config.visual_position_layout)

  def forward(self, input_ids: torch.LongTensor | None = None,
              pixel_values: torch.FloatTensor | None = None,
              attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache=None,
              inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
              use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs
              ) -> CausalLMOutputWithPast:
    """input_ids [B, S] with N image tokens per image, pixel_values [I, 3, H, W] (the
    images in the order their tokens appear, row by row). Without ``position_ids`` the
    positions are computed from the whole rows (a call without a cache); `generate`
    computes them for the prompt and extends them."""
    if inputs_embeds is None:
      inputs_embeds = self.get_input_embeddings()(input_ids)
    num_tokens = 1
    if pixel_values is not None:
      num_tokens = self.tokens_per_image(input_ids, pixel_values.shape[0])
      visual = self.visual_tokens(pixel_values.to(self.vision_model.dtype), num_tokens)
      mask = (input_ids == self.config.image_token_id)[..., None].expand_as(inputs_embeds)
      inputs_embeds = inputs_embeds.masked_scatter(mask, visual.to(inputs_embeds.dtype))
    cached = cache is not None and cache.get_seq_length() > 0
    if attention_mask is None and input_ids is not None and not cached:
      # Explicit: without a mask transformers reads a jump in the positions (an image's
      # tokens spanning several) as the start of another packed sequence.
      attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
      if cached:
        raise ValueError("decoding from a cache needs position_ids (generate passes them)")
      position_ids = self.positions(input_ids, attention_mask, num_tokens)
    return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, labels=labels,
                               use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

  def expand_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with one image token per image -> rows with ``num_tokens`` each, left-padded
    again: (input_ids [B, S'], attention_mask [B, S'])."""
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
      ids = ids[mask.bool()]
      repeat = torch.where(ids == self.config.image_token_id, num_tokens, 1)
      rows.append(torch.repeat_interleave(ids, repeat))
    width = max(len(r) for r in rows)
    pad = self.generation_config.pad_token_id or 0
    out = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(out)
    for i, r in enumerate(rows):
      out[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return out, mask

  @torch.no_grad()
  def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               num_visual_tokens: int | None = None, **kwargs):
    """Greedy (or any) decoding at N visual tokens per image. With ``num_visual_tokens``
    the prompt holds one image token per image, expanded here to N; without it the
    prompt already holds N per image (the processor's output)."""
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    num_tokens = 1
    if pixel_values is not None:
      if num_visual_tokens is not None:
        per_image = self.tokens_per_image(input_ids, pixel_values.shape[0])
        if per_image != 1:
          raise ValueError(f"num_visual_tokens={num_visual_tokens} expands one image token "
                           f"per image; this prompt has {per_image} per image")
        input_ids, attention_mask = self.expand_image_tokens(input_ids, attention_mask,
                                                             num_visual_tokens)
      num_tokens = self.tokens_per_image(input_ids, pixel_values.shape[0])
    position_ids = self.positions(input_ids, attention_mask, num_tokens)
    return super().generate(input_ids=input_ids, pixel_values=pixel_values,
                            attention_mask=attention_mask, position_ids=position_ids, **kwargs)


__all__ = ["TokenFlexForConditionalGeneration", "rotary_positions"]
