r"""Evaluates a trained TokenFLEX checkpoint at every visual-token count.

  python -m tokenflex_jax.eval --workdir=/tmp/run \
      [--config.eval.checkpoint_step=800] [--config.eval.token_counts='(64,256)']

Without ``--config`` the workdir's own config is used, overrides applied to it; a
``--config`` must describe the model the workdir was trained with (`cli`,
`trained_model`). ``config.eval`` sets what to evaluate, ``config.mesh`` the mesh. Writes
WORKDIR/eval/<suite or data file stem>/step_<N>/{results.json,results.md,accuracy.png}
and lists it in WORKDIR/eval/index.json (`evaluation.outputs`); an existing evaluation
of that suite and step is kept unless ``--config.eval.overwrite=True``.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from tokenflex_jax import sharding
from tokenflex_jax.app import cli, config_checks, config_schema, trained_model
from tokenflex_jax.evaluation import outputs
from tokenflex_jax.evaluation.evaluator import evaluate
from tokenflex_jax.evaluation.report import markdown_table
from tokenflex_jax.specs import RunSpec


def run_eval(config: config_schema.ConfigDict | RunSpec, workdir: str) -> dict:
  config = config_schema.to_spec(config)
  config_checks.check(config, config_checks.EVAL)  # Before any checkpoint is read or compile.
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules, config.eval.checkpoint_step)
  eval_root, suite = os.path.join(workdir, "eval"), outputs.suite_name(config)
  outputs.check_free(eval_root, suite, trained.step, config.eval.overwrite)  # Before the work.
  logging.info("evaluating %s at step %d, counts %s", workdir, trained.step,
               tuple(config.eval.token_counts))
  results = evaluate(trained.model, trained.params, trained.tokenizer, config, mesh, rules,
                     trained.step)
  out_dir = outputs.results_dir(eval_root, suite, trained.step)
  if jax.process_index() == 0:
    outputs.save(eval_root, suite, results, "eval", overwrite=config.eval.overwrite)
    logging.info("wrote %s/{results.json,results.md,accuracy.png} (listed in %s/%s)\n%s",
                 out_dir, eval_root, outputs.INDEX, markdown_table(results))
  return results


def main() -> None:
  cli.run(run_eval)


if __name__ == "__main__":
  main()
