"""Start-up pieces shared by the binaries: workdir, tokenizer, model config, mesh."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from absl import logging

from tokenflex_jax import sharding
from tokenflex_jax.data import chat
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.data.tokenizer import ensure_tokenizer
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import POOLING_MODES, ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training import steps
from tokenflex_jax.training.optimizer import make_optimizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and records the config the run uses (process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (written by `prepare_workdir`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def tokenizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.tokenizer`` (kind, path, template, image_token); configs written before it
  existed used the project's sentencepiece model at ``config.data.tokenizer_path``."""
  if "tokenizer" in config:
    return config.tokenizer
  return ml_collections.ConfigDict(dict(kind="project",
                                        path=config.data.get("tokenizer_path", ""),
                                        template="", image_token=""))


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  t = tokenizer_config(config)
  if t.kind == "project":
    return t.path or os.path.join(workdir, TOKENIZER_FILE)
  if not t.path:
    raise ValueError(f"config.tokenizer.kind={t.kind!r} needs "
                     "config.tokenizer.path (the LLM's tokenizer.json or .model file)")
  return t.path


def tokenizer_loader(config: ml_collections.ConfigDict, workdir: str
                     ) -> Callable[[], ChatTokenizer]:
  """A picklable zero-argument function that loads the run's tokenizer (grain workers
  call it on their side)."""
  t = tokenizer_config(config)
  return functools.partial(chat.load_tokenizer, kind=t.kind, path=tokenizer_path(config, workdir),
                           template=t.template, image_token=t.image_token,
                           system_prompt=t.get("system_prompt"))


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> ChatTokenizer:
  """The run's tokenizer. A project tokenizer is the configured file, else one inherited
  from the init workdir (so every stage shares one vocabulary), else trained on the
  suite's text; an LLM's tokenizer (kind "hf" or "sentencepiece") is loaded as it is."""
  t = tokenizer_config(config)
  if t.kind != "project":
    tokenizer = tokenizer_loader(config, workdir)()
    logging.info("tokenizer %s (%s, template %s): %d ids", t.path, t.kind, t.template,
                 tokenizer.vocab_size)
    return tokenizer
  path = tokenizer_path(config, workdir)
  if not os.path.exists(path) and not t.path:
    for source in (config.init.checkpoint, config.init.vision_checkpoint):
      inherited = os.path.join(source, TOKENIZER_FILE) if source else ""
      if inherited and os.path.exists(inherited):
        if jax.process_index() == 0:
          shutil.copyfile(inherited, path + ".tmp")
          os.replace(path + ".tmp", path)
        break
  tokenizer = ensure_tokenizer(path)
  logging.info("tokenizer %s: %d pieces", path, tokenizer.vocab_size)
  return tokenizer


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
  return ViTConfig(**config.model.vit.to_dict())


def model_config(config: ml_collections.ConfigDict, tokenizer: ChatTokenizer) -> VLMConfig:
  """The VLM's static configuration; checks it against the tokenizer."""
  llm = LLMConfig(**config.model.llm.to_dict())
  if tokenizer.vocab_size > llm.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={llm.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} pieces")
  projector = ProjectorConfig(**config.model.projector.to_dict())
  if projector.pooling not in POOLING_MODES:
    raise ValueError(f"config.model.projector.pooling must be one of {POOLING_MODES}, "
                     f"got {projector.pooling!r}")
  return VLMConfig(vit=vit_config(config), projector=projector, llm=llm,
                   image_token_id=tokenizer.image_id, pad_token_id=tokenizer.pad_id,
                   visual_position_span=config.model.get("visual_position_span", 0),
                   remat=config.model.get("remat", False))


def mesh_and_rules(config: ml_collections.ConfigDict):
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = sharding.rules_from_config(config.sharding.rules)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  return mesh, rules


def multipliers(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {k: float(v) for k, v in config.lr_multipliers.to_dict().items()}


def frozen_groups(mults: dict[str, float]) -> tuple[str, ...]:
  """The module groups with learning-rate multiplier 0 (no backward pass through them)."""
  return tuple(k for k, m in mults.items() if m == 0)


def optimizer_and_step(config: ml_collections.ConfigDict, model: VLM,
                       init_params: Callable[[jax.Array], Any]
                       ) -> tuple[optax.GradientTransformation, Callable, tuple[str, ...]]:
  """(optimizer, train-step function (state, batch, num_tokens), frozen module groups)
  for ``config``; ``init_params`` gives the parameter shapes (rng -> boxed params)."""
  mults = multipliers(config)
  abstract_params = jax.eval_shape(lambda r: nn.unbox(init_params(r)), jax.random.key(0))
  tx, schedule = make_optimizer(config.optimizer, mults, config.total_steps, abstract_params)
  frozen = frozen_groups(mults)
  logging.info("learning-rate multipliers %s; frozen: %s", mults, frozen or "none")
  return tx, steps.make_vlm_train_step(model, tx, schedule, config.loss_weighting,
                                       frozen), frozen
