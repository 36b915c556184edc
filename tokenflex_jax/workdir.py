"""The files of a run's workdir that are not checkpoints: the config it was trained with.

Layout: ``WORKDIR/config.json`` (this module), ``WORKDIR/tokenizer.model`` (a project
tokenizer, `run_tokenizer`), ``WORKDIR/checkpoints/`` (`training.checkpointing`),
``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard/`` (`training.metrics`),
``WORKDIR/eval/`` (the eval binary). A workdir may be local or ``gs://`` (`paths`).
"""

from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath

from tokenflex_jax import config_schema
from tokenflex_jax.errors import MissingInputError

CONFIG_FILE = "config.json"


def prepare(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and records the config the run uses (process 0 writes)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


def has_config(workdir: str) -> bool:
  return (epath.Path(workdir) / CONFIG_FILE).exists()


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, read through the schema (so a workdir
  written by an older version gets today's keys, with their defaults)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingInputError(f"{path} not found: is {workdir!r} a training workdir?")
  return config_schema.read_saved(json.loads(path.read_text()))
