"""The model's static configuration from a run config: config -> ViTConfig / VLMConfig."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from tokenflex_jax import errors
from tokenflex_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import MLP_KINDS, POOLING_MODES, ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VISUAL_POSITION_LAYOUTS, VLMConfig
from tokenflex_jax.specs import RunSpec


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


def _check_sizes(section: str, values: ViTConfig | LLMConfig | ProjectorConfig,
                 names: tuple[str, ...]) -> None:
  """Raises `errors.ConfigError` unless ``section``'s ``names`` are positive (integers:
  `config_schema.to_spec` checked the types)."""
  for name in names:
    if getattr(values, name) < 1:
      raise errors.ConfigError(f"{section}.{name}={getattr(values, name)!r} must be a "
                               "positive integer")


def _check_dtype(section: str, values: ViTConfig | LLMConfig | ProjectorConfig) -> None:
  try:
    floating = jnp.issubdtype(jnp.dtype(values.dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise errors.ConfigError(f"{section}.dtype={values.dtype!r} is not a floating-point "
                             "dtype (e.g. 'float32', 'bfloat16')")


def vit_config(config: RunSpec) -> ViTConfig:
  """``config.model.vit``, checked: positive sizes, a width the heads divide, a patch no
  larger than the images (``config.data.image_size``), a floating-point dtype."""
  vit = config.model.vit
  _check_sizes("config.model.vit", vit, ("image_size", "patch_size", "width", "depth",
                                         "mlp_dim", "num_heads"))
  if vit.width % vit.num_heads:
    raise errors.ConfigError(f"config.model.vit.width={vit.width} is not divisible by "
                             f"config.model.vit.num_heads={vit.num_heads}")
  if vit.patch_size > min(vit.image_size, config.data.image_size):
    raise errors.ConfigError(f"config.model.vit.patch_size={vit.patch_size} is larger than "
                             f"the images (config.model.vit.image_size={vit.image_size}, "
                             f"config.data.image_size={config.data.image_size})")
  _check_dtype("config.model.vit", vit)
  return vit


def llm_config(config: RunSpec) -> LLMConfig:
  """``config.model.llm``, checked: positive sizes, query heads a multiple of the KV
  heads (grouped-query attention), an even head_dim (rotary embeddings rotate pairs),
  a floating-point dtype (`LLMConfig` itself refuses an unknown rope_type)."""
  llm = config.model.llm
  _check_sizes("config.model.llm", llm, ("vocab_size", "width", "depth", "num_heads",
                                         "num_kv_heads", "head_dim", "mlp_dim"))
  if llm.num_heads % llm.num_kv_heads:
    raise errors.ConfigError(f"config.model.llm.num_heads={llm.num_heads} is not a multiple "
                             f"of config.model.llm.num_kv_heads={llm.num_kv_heads} (each KV "
                             "head serves a group of query heads)")
  if llm.head_dim % 2:
    raise errors.ConfigError(f"config.model.llm.head_dim={llm.head_dim} must be even (rotary "
                             "embeddings rotate pairs of channels)")
  _check_dtype("config.model.llm", llm)
  return llm


def projector_config(config: RunSpec) -> ProjectorConfig:
  """``config.model.projector``, checked (its pooling, MLP, position embedding, dtype)."""
  projector = config.model.projector
  if projector.pooling not in POOLING_MODES:
    raise errors.ConfigError(f"config.model.projector.pooling must be one of "
                             f"{POOLING_MODES}, got {projector.pooling!r}")
  if projector.mlp not in MLP_KINDS:
    raise errors.ConfigError(f"config.model.projector.mlp must be one of {MLP_KINDS}, "
                             f"got {projector.mlp!r}")
  _check_sizes("config.model.projector", config.model.projector, ("mlp_ratio",))
  if projector.position_embedding and config.model.vit.width % 4:
    raise errors.ConfigError(
        f"config.model.projector.position_embedding needs config.model.vit.width divisible "
        f"by 4 (a 2-D sine-cosine table), got {config.model.vit.width}")
  _check_dtype("config.model.projector", config.model.projector)
  return projector


def layer_flags(config: RunSpec) -> dict[str, object]:
  """The layer stacks' performance flags (``remat_policy``, ``scan_layers``,
  ``attention``) from ``config.model``, checked; they never change the parameters."""
  if config.model.remat_policy not in REMAT_POLICIES:
    raise errors.ConfigError(f"config.model.remat_policy must be one of {REMAT_POLICIES}, "
                             f"got {config.model.remat_policy!r}")
  if config.model.attention not in ATTENTION_IMPLEMENTATIONS:
    raise errors.ConfigError(f"config.model.attention must be one of "
                             f"{ATTENTION_IMPLEMENTATIONS}, got {config.model.attention!r}")
  return dict(remat_policy=config.model.remat_policy, scan_layers=config.model.scan_layers,
              attention=config.model.attention)


def _tokenizer_name(config: RunSpec) -> str:
  t = config.tokenizer
  return f"config.tokenizer.kind={t.kind!r}, path={t.path or 'WORKDIR/tokenizer.model'!r}"


def vlm_config(config: RunSpec, tokenizer: TokenIds) -> VLMConfig:
  """The VLM's static configuration, every ``config.model`` field checked (raises
  `errors.ConfigError` naming the field); checks it against the tokenizer."""
  llm = llm_config(config)
  if tokenizer.vocab_size > llm.vocab_size:
    raise errors.ConfigError(f"config.model.llm.vocab_size={llm.vocab_size} is smaller than "
                             f"the tokenizer's {tokenizer.vocab_size} pieces "
                             f"({_tokenizer_name(config)})")
  projector = projector_config(config)
  if config.model.visual_position_layout not in VISUAL_POSITION_LAYOUTS:
    raise errors.ConfigError(f"config.model.visual_position_layout must be one of "
                             f"{VISUAL_POSITION_LAYOUTS}, got "
                             f"{config.model.visual_position_layout!r}")
  if config.model.visual_position_span < 0:
    raise errors.ConfigError(f"config.model.visual_position_span="
                             f"{config.model.visual_position_span} must be >= 0 (0: one "
                             "position per visual token)")
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
