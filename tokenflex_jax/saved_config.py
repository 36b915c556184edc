"""A config file for ``--config`` that returns a workdir's own config:

  --config=tokenflex_jax/saved_config.py:/runs/stage3

is the config /runs/stage3 was trained with (its config.json, read through the schema).
Every binary that takes ``--workdir`` uses it when ``--config`` is not given (see
`cli.with_workdir_config`), so ``--config.a.b=V`` overrides then apply to the workdir's
config.
"""

from __future__ import annotations

import ml_collections

from tokenflex_jax import workdir


def get_config(directory: str) -> ml_collections.ConfigDict:
  return workdir.read_config(directory)
