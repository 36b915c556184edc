"""The run's configuration as frozen, typed specs: what every library function takes.

A binary reads its ``ml_collections`` config (``--config=configs/x.py --config.a.b=1``,
or a workdir's config.json) and turns it into a `RunSpec` once, at start-up
(`config_schema.to_spec`, which checks each field's type and names the field it
refuses); `config_checks` then validates the values, before anything is written. From
there on data, training, evaluation and sharding read the same fields by the same names
(``spec.model.vit.width``, ``spec.data.source``), and nothing can change them.

The defaults live in one place, `config_schema.base_config`; these classes have none,
so a spec is always a whole config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig

_frozen = dataclasses.dataclass(frozen=True)


@_frozen
class ModelSpec:
  """``config.model``: the three towers' shapes, how visual tokens are placed, and the
  performance flags (which never change the parameters)."""
  vit: ViTConfig
  projector: ProjectorConfig
  llm: LLMConfig
  remat_policy: str
  scan_layers: bool
  attention: str
  visual_position_span: int
  visual_position_layout: str


@_frozen
class DataSpec:
  """``config.data``: where training examples come from and how they become rows."""
  source: str
  tfds_dir: str
  seed: int
  image_size: int
  num_examples: int
  families: tuple[str, ...]
  family_weights: tuple[float, ...]
  max_text_length: int
  image_first: bool
  num_workers: int
  truncate: bool
  on_bad_record: str
  mixture: tuple[tuple[Any, ...], ...]   # ((source, tfds_dir, weight), ...) or ()
  image_slots: int
  pack: bool


@_frozen
class TokenizerSpec:
  """``config.tokenizer``: the project's sentencepiece model or an LLM's own."""
  kind: str
  path: str
  template: str
  image_token: str
  system_prompt: str | None


@_frozen
class OptimizerSpec:
  """``config.optimizer``: AdamW with warmup and cosine decay, clipped."""
  learning_rate: float
  warmup_steps: int
  end_lr_fraction: float
  b1: float
  b2: float
  weight_decay: float
  clip_norm: float
  mu_dtype: str


@_frozen
class InitSpec:
  """``config.init``: workdirs to start from ("" : none)."""
  checkpoint: str
  vision_checkpoint: str


@_frozen
class MeshSpec:
  """``config.mesh``: (data, fsdp, tensor) sizes, -1 for the rest."""
  shape: tuple[int, ...]


@_frozen
class ShardingSpec:
  """``config.sharding``: the logical-axis rules table (`sharding`)."""
  rules: tuple[Any, ...]


@_frozen
class VisionPretrainSpec:
  """``config.vision_pretrain``: stage 0's loss weights."""
  object_weight: float


@_frozen
class EvalSpec:
  """``config.eval``: the evaluation the eval binary (and periodic evaluation) runs."""
  suite: str
  data_path: str
  benchmark: str
  image_dir: str
  skip_malformed: bool
  token_counts: tuple[int, ...]
  examples_per_family: int
  batch_size: int
  max_prompt_length: int
  max_new_tokens: int
  seed: int
  tag: str
  checkpoint_step: int
  overwrite: bool
  auto_threshold: float
  auto_counts: tuple[int, ...]
  router_tolerance: float
  save_router: bool


@_frozen
class RunSpec:
  """A whole run config (`config_schema.base_config` lists every field and its default).
  ``lr_multipliers`` maps each top-level parameter module to its learning-rate factor."""
  stage: int
  seed: int
  model: ModelSpec
  data: DataSpec
  tokenizer: TokenizerSpec
  token_counts: tuple[int, ...]
  token_probs: tuple[float, ...]
  loss_weighting: str
  loss_vocab_chunk: int
  compiler_optimization_level: str
  batch_size: int
  microbatches: int
  count_per_microbatch: bool
  total_steps: int
  optimizer: OptimizerSpec
  lr_multipliers: Mapping[str, float]
  init: InitSpec
  mesh: MeshSpec
  sharding: ShardingSpec
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  compilation_cache: bool
  compilation_cache_dir: str
  vision_pretrain: VisionPretrainSpec
  eval_every: int
  eval: EvalSpec


def as_dict(spec: Any) -> dict[str, Any]:
  """A spec as nested plain dicts (what a workdir's config.json holds)."""
  return dataclasses.asdict(spec)


def replace(spec: Any, **changes: Any) -> Any:
  """``spec`` with ``changes``; a dotted key (``"model.scan_layers"``, written
  ``model__scan_layers``) replaces a field of a nested spec."""
  nested: dict[str, dict[str, Any]] = {}
  flat = {}
  for key, value in changes.items():
    head, _, rest = key.partition("__")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      flat[key] = value
  for head, inner in nested.items():
    flat[head] = replace(getattr(spec, head), **inner)
  return dataclasses.replace(spec, **flat)
