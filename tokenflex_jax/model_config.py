"""The model's static configuration from a run config: config -> ViTConfig / VLMConfig."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import ml_collections

from tokenflex_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import MLP_KINDS, POOLING_MODES, ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VISUAL_POSITION_LAYOUTS, VLMConfig


class TokenIds(Protocol):
  """What the model config needs from a tokenizer (a `ChatTokenizer` has it)."""
  vocab_size: int
  image_id: int
  pad_id: int


@dataclasses.dataclass(frozen=True)
class FixedTokenIds:
  """`TokenIds` without a tokenizer: for compiling from shapes alone (aot, tests)."""
  vocab_size: int
  image_id: int = 1
  pad_id: int = 0


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
  return ViTConfig(**config.model.vit.to_dict())


def layer_flags(config: ml_collections.ConfigDict) -> dict[str, object]:
  """The layer stacks' performance flags (``remat_policy``, ``scan_layers``,
  ``attention``) from ``config.model``, checked; they never change the parameters."""
  if config.model.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy must be one of {REMAT_POLICIES}, "
                     f"got {config.model.remat_policy!r}")
  if config.model.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {config.model.attention!r}")
  return dict(remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers,
              attention=config.model.attention)


def vlm_config(config: ml_collections.ConfigDict, tokenizer: TokenIds) -> VLMConfig:
  """The VLM's static configuration; checks it against the tokenizer."""
  llm = LLMConfig(**config.model.llm.to_dict())
  if tokenizer.vocab_size > llm.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={llm.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} pieces")
  projector = ProjectorConfig(**config.model.projector.to_dict())
  if projector.pooling not in POOLING_MODES:
    raise ValueError(f"config.model.projector.pooling must be one of {POOLING_MODES}, "
                     f"got {projector.pooling!r}")
  if projector.mlp not in MLP_KINDS:
    raise ValueError(f"config.model.projector.mlp must be one of {MLP_KINDS}, "
                     f"got {projector.mlp!r}")
  if config.model.visual_position_layout not in VISUAL_POSITION_LAYOUTS:
    raise ValueError(f"config.model.visual_position_layout must be one of "
                     f"{VISUAL_POSITION_LAYOUTS}, got {config.model.visual_position_layout!r}")
  return VLMConfig(vit=vit_config(config), projector=projector, llm=llm,
                   image_token_id=tokenizer.image_id, pad_token_id=tokenizer.pad_id,
                   visual_position_span=config.model.visual_position_span,
                   visual_position_layout=config.model.visual_position_layout,
                   **layer_flags(config))


def model_differences(given: VLMConfig, trained: VLMConfig) -> list[str]:
  """The fields (e.g. ``.llm.width``) in which two models differ; the performance flags
  (rematerialisation, scanned layers, attention) are not part of the model and are
  ignored."""
  flat = lambda c: dict(jax.tree_util.tree_leaves_with_path(dataclasses.asdict(
      dataclasses.replace(c, remat_policy="none", scan_layers=True, attention="auto"))))
  trained_fields = flat(trained)
  return sorted(jax.tree_util.keystr(k) for k, v in flat(given).items()
                if trained_fields.get(k) != v)
