"""The files of a run's workdir that are not checkpoints: the config it was trained with.

Layout: ``WORKDIR/config.json`` (this module), ``WORKDIR/tokenizer.model`` (a project
tokenizer, `run_tokenizer`), ``WORKDIR/checkpoints/`` (`training.checkpointing`),
``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard/`` (`training.metrics`),
``WORKDIR/eval/`` (the eval binary).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from tokenflex_jax import config_schema
from tokenflex_jax.errors import MissingInputError

CONFIG_FILE = "config.json"


def prepare(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and records the config the run uses (process 0 writes)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))


def has_config(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, read through the schema (so a workdir
  written by an older version gets today's keys, with their defaults)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise MissingInputError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path, encoding="utf-8") as f:
    return config_schema.read_saved(json.load(f))
