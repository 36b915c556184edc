"""A config file for ``--config`` that returns a workdir's own config:

  --config=tokenflex_jax/app/saved_config.py:/runs/stage3

is the config /runs/stage3 was trained with (its config.json, read through the schema).
Every binary that takes ``--workdir`` uses it when ``--config`` is not given (see
`cli.with_workdir_config`), so ``--config.a.b=V`` overrides then apply to the workdir's
config.
"""

from __future__ import annotations

from tokenflex_jax.app import config_schema, workdir


def get_config(directory: str) -> config_schema.ConfigDict:
  return config_schema.read_saved(workdir.saved_json(directory))
