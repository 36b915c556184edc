"""The configuration of an exported TokenFLEX model (a SigLIP tower, the token-adaptive
projector and a Qwen2 / Llama decoder), written by tokenflex_jax's exporter.

Its layout follows Ristretto's (``vision_config``, ``llm_config``, ``num_image_token``,
``select_layer``, ``force_image_size``, ``template``); the projector and rotary fields
are TokenFLEX's own.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class TokenFlexConfig(PreTrainedConfig):
  """vision_config: a SigLIP vision tower's; llm_config: a Qwen2 or Llama causal LM's.

  num_image_token: the visual tokens per image when none is asked for (a square);
  visual_token_counts: the counts it was trained at (any square works).
  pooling: "adaptive_avg" (torch's adaptive_avg_pool2d) or "resize_avg" (bilinear
  align_corners resize to a multiple of n, then n x n average pooling: Ristretto's).
  projector_mlp: "swiglu" or "gelu"; projector_position_embedding: a learned table added
  to the patch features before pooling. visual_position_span: 0, one rotary position
  per visual token; A > 0, an image's N tokens span A positions, laid out "raster" or
  "grid" (visual_position_layout), as tokenflex_jax.models.vlm describes.
  """

  model_type = "tokenflex"
  sub_configs_defaults = {
      "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
      "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
  }
  vision_config: dict | PreTrainedConfig | None = None
  llm_config: dict | PreTrainedConfig | None = None
  image_token_id: int = 0
  image_token: str = "<image>"
  num_image_token: int = 256
  visual_token_counts: list[int] | None = None
  select_layer: int = -1
  force_image_size: int | None = None
  template: str | None = None
  pooling: str = "adaptive_avg"
  projector_mlp: str = "swiglu"
  projector_mlp_ratio: int = 3
  projector_position_embedding: bool = False
  projector_layer_norm_eps: float = 1e-6
  visual_position_span: int = 0
  visual_position_layout: str = "raster"
  tie_word_embeddings: bool = False

  def __post_init__(self, **kwargs):
    super().__post_init__(**kwargs)
    # As LLaVA's: the decoder's own tying decides.
    if not self.tie_word_embeddings and self.llm_config.tie_word_embeddings:
      self.tie_word_embeddings = self.llm_config.tie_word_embeddings

  def get_text_config(self, *args, **kwargs):
    return self.llm_config


__all__ = ["TokenFlexConfig"]
