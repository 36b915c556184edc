r"""Evaluates a trained TokenFLEX checkpoint at every visual-token count.

  python -m tokenflex_jax.eval --workdir=/tmp/run \
      [--config.eval.checkpoint_step=800] [--config.eval.token_counts='(64,256)']

Without ``--config`` the workdir's own config is used, overrides applied to it; a
``--config`` must describe the model the workdir was trained with (`cli`,
`trained_model`). ``config.eval`` sets what to evaluate, ``config.mesh`` the mesh. Writes
WORKDIR/eval/<suite or data file stem>/step_<N>/{results.json,results.md,accuracy.png}
and lists it in WORKDIR/eval/index.json (`evaluation.outputs`); an existing evaluation
of that suite and step is kept unless ``--config.eval.overwrite=True``. With
``--config.eval.save_router=True`` the router fitted on these questions is also written to
WORKDIR/router.json, for ``predict --num_tokens=auto`` (evaluate a development seed,
``--config.eval.seed``, for that).
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from tokenflex_jax import errors, paths, sharding
from tokenflex_jax.app import cli, config_checks, config_schema, trained_model
from tokenflex_jax.evaluation import outputs
from tokenflex_jax.evaluation.evaluator import evaluate
from tokenflex_jax.evaluation.report import markdown_table
from tokenflex_jax.specs import RunSpec


def run_eval(config: config_schema.ConfigDict | RunSpec, workdir: str) -> dict:
  config = config_schema.to_spec(config)
  config_checks.check(config, config_checks.EVAL)  # Before any checkpoint is read or compile.
  trained_counts = set(config.token_counts) & set(config.eval.token_counts)
  if config.eval.save_router and len(trained_counts) < 2:
    raise errors.ConfigError(
        f"config.eval.save_router=True needs two or more of the trained counts "
        f"config.token_counts={tuple(config.token_counts)} in config.eval.token_counts="
        f"{tuple(config.eval.token_counts)}")
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
    if config.eval.save_router:
      path = os.path.join(workdir, outputs.ROUTER_FILE)
      paths.write_atomically(path, json.dumps(results["router"], indent=1).encode("utf-8"))
      logging.info("wrote %s, the router predict --num_tokens=auto uses (fitted on %s)",
                   path, results["router"]["fitted_on"])
  return results


def main() -> None:
  cli.run(run_eval, compilation_cache=True)


if __name__ == "__main__":
  main()
