"""A trained model read back from its workdir, for the eval, predict and convert binaries.

The one rule for every binary that reads a workdir: the workdir's ``config.json``
describes the model it was trained with. A ``--config`` given as well supplies the rest
(eval settings, mesh, ...) and must describe the same model, else it is refused with
the fields that differ; without ``--config`` the workdir's own config is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from tokenflex_jax import errors, model_config
from tokenflex_jax.app import run_tokenizer, workdir as workdir_lib
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import checkpointing, steps


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  model: VLM
  params: Any          # sharded over the mesh it was loaded onto
  tokenizer: ChatTokenizer
  step: int


def run_config(workdir: str, given: RunSpec | None
               ) -> RunSpec:
  """``given`` (a ``--config``), or the workdir's own config when none is given."""
  return workdir_lib.read_config(workdir) if given is None else given


def check_same_model(config: RunSpec, workdir: str,
                     tokenizer: ChatTokenizer) -> None:
  """Refuses a ``config`` whose model differs from the one ``workdir`` was trained with
  (e.g. other visual positions, which would load but answer wrongly). A workdir without
  config.json (e.g. converted towers) is not checked."""
  if not workdir_lib.has_config(workdir):
    return
  trained = model_config.vlm_config(workdir_lib.read_config(workdir), tokenizer)
  differ = model_config.model_differences(model_config.vlm_config(config, tokenizer), trained)
  if differ:
    raise errors.ConfigError(f"--config describes another model than {workdir} was trained "
                             f"with; fields {', '.join(differ)} differ (pass the training "
                             f"run's overrides)")


def load(config: RunSpec, workdir: str, mesh, rules,
         step: int = -1) -> TrainedModel:
  """The model of ``config`` with the params of ``workdir``'s checkpoint ``step`` (-1:
  the latest), laid out on ``mesh`` by the logical-axis ``rules``. Raises
  `errors.MissingInputError` naming the workdir and its steps if it has no such step."""
  step = checkpointing.resolve_step(workdir, step)  # First: a wrong --workdir says so.
  tokenizer = run_tokenizer.loader(config, workdir)()
  check_same_model(config, workdir, tokenizer)
  model = VLM(model_config.vlm_config(config, tokenizer))
  size, n = config.data.image_size, config.token_counts[0]
  abstract = steps.abstract_params(lambda r: model.init(
      r, jnp.zeros((1, size, size, 3)), jnp.zeros((1, config.data.max_text_length), jnp.int32),
      n)["params"], mesh, rules)
  params, step = checkpointing.load_params(workdir, abstract, step)
  return TrainedModel(model, params, tokenizer, step)
