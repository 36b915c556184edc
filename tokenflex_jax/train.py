r"""Trains a TokenFLEX VLM: one visual-token budget per step, drawn from a static set.

  python -m tokenflex_jax.train --config=configs/demo.py --workdir=/tmp/run \
      [--config.total_steps=100 ...]

A restarted run resumes from the latest checkpoint in its workdir. Each token count
has its own train step, compiled ahead of time at start-up; the loop never compiles.
What is particular to the VLM (its loss, batch and buckets) is `training.vlm_task`;
the rest is the trainer core, `training.trainer`.
"""

from __future__ import annotations

import os

from tokenflex_jax import model_config, sharding
from tokenflex_jax.app import cli, config_checks, config_schema, run_tokenizer
from tokenflex_jax.app import workdir as workdir_lib
from tokenflex_jax.evaluation import periodic
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import steps, trainer
from tokenflex_jax.training.vlm_task import vlm_task


def train(config: config_schema.ConfigDict | RunSpec, workdir: str) -> steps.TrainState:
  """Trains until ``config.total_steps``, resuming from ``workdir`` if it has checkpoints."""
  config = config_schema.to_spec(config)
  # Before the workdir is written, data read or anything compiled.
  config_checks.check(config, config_checks.TRAIN)
  workdir_lib.prepare(workdir, config)
  mesh, rules = sharding.mesh_from_config(config)
  tokenizer = run_tokenizer.prepare(config, workdir)
  model = VLM(model_config.vlm_config(config, tokenizer))
  load_tokenizer = run_tokenizer.loader(config, workdir)
  evaluate = (periodic.make_periodic_eval(model, load_tokenizer, config, mesh, rules,
                                          os.path.join(workdir, "eval"))
              if config.eval_every > 0 else None)
  task = vlm_task(config, model, mesh, rules, load_tokenizer, evaluate)
  return trainer.train(config, workdir, task, mesh, rules)


def main() -> None:
  cli.run(train, compilation_cache=True)


if __name__ == "__main__":
  main()
