"""The files of a run's workdir that are not checkpoints: the config it was trained with.

Layout: ``WORKDIR/config.json`` (this module), ``WORKDIR/tokenizer.model`` (a project
tokenizer, `run_tokenizer`), ``WORKDIR/checkpoints/`` (`training.checkpointing`),
``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard/`` (`training.metrics`),
``WORKDIR/eval/`` (the eval binary). A workdir may be local or ``gs://`` (`paths`).
"""

from __future__ import annotations

import json

from typing import Any

import jax
from etils import epath

from tokenflex_jax import specs
from tokenflex_jax.app import config_schema
from tokenflex_jax.errors import MissingInputError

CONFIG_FILE = "config.json"


def prepare(workdir: str, config: specs.RunSpec) -> None:
  """Creates the workdir and records the config the run uses (process 0 writes)."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / CONFIG_FILE).write_text(json.dumps(specs.as_dict(config), indent=2))


def has_config(workdir: str) -> bool:
  return (epath.Path(workdir) / CONFIG_FILE).exists()


def saved_json(workdir: str) -> dict[str, Any]:
  """The workdir's config.json as saved; raises `MissingInputError` if there is none."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingInputError(f"{path} not found: is {workdir!r} a training workdir?")
  return json.loads(path.read_text())


def read_config(workdir: str) -> specs.RunSpec:
  """The config a workdir was trained with, read through the schema (so a workdir
  written by an older version gets today's keys, with their defaults)."""
  return config_schema.read_saved_spec(saved_json(workdir))
