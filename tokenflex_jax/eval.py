r"""Evaluates a trained TokenFLEX checkpoint at every visual-token count.

  python -m tokenflex_jax.eval --config=configs/demo.py --workdir=/tmp/run \
      [--config.eval.checkpoint_step=800] [--config.eval.token_counts='(64,256)']

Writes WORKDIR/eval/results.json, results.md and accuracy.png.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tokenflex_jax import cli, setup, sharding
from tokenflex_jax.evaluation.evaluator import evaluate
from tokenflex_jax.evaluation.report import markdown_table, write_results
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training import checkpointing


def check_same_model(config: ml_collections.ConfigDict, workdir: str,
                     model_config: VLMConfig, tokenizer: ChatTokenizer) -> None:
  """Refuses a ``config`` whose model differs from the one the workdir was trained with
  (e.g. other visual positions, which would load but answer wrongly). The rematerialisation
  flag may differ; a workdir without config.json is not checked."""
  if not os.path.exists(os.path.join(workdir, setup.CONFIG_FILE)):
    return
  trained = dataclasses.replace(
      setup.model_config(setup.load_workdir_config(workdir), tokenizer), remat=False)
  given = dataclasses.replace(model_config, remat=False)
  flat = lambda c: dict(jax.tree_util.tree_leaves_with_path(dataclasses.asdict(c)))
  differ = sorted(jax.tree_util.keystr(k) for k, v in flat(given).items()
                  if flat(trained).get(k) != v)
  if differ:
    raise ValueError(f"--config describes another model than {workdir} was trained with; "
                     f"fields {', '.join(differ)} differ (pass the training run's overrides)")


def load_model(config: ml_collections.ConfigDict, workdir: str, mesh, rules, step: int = -1):
  """(model, sharded params, tokenizer, step) from a workdir's checkpoint."""
  tokenizer = setup.tokenizer_loader(config, workdir)()
  model = VLM(setup.model_config(config, tokenizer))
  check_same_model(config, workdir, model.config, tokenizer)
  size, n = config.data.image_size, config.token_counts[0]
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda r: model.init(
        r, jnp.zeros((1, size, size, 3)), jnp.zeros((1, config.data.max_text_length), jnp.int32),
        n)["params"], jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          sharding.strip_boxes(boxed), shardings)
  params, step = checkpointing.load_params(workdir, abstract, step)
  return model, params, tokenizer, step


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  mesh, rules = setup.mesh_and_rules(config)
  model, params, tokenizer, step = load_model(config, workdir, mesh, rules,
                                              config.eval.checkpoint_step)
  logging.info("evaluating %s at step %d, counts %s", workdir, step,
               tuple(config.eval.token_counts))
  results = evaluate(model, params, tokenizer, config, mesh, rules, step)
  out_dir = os.path.join(workdir, "eval")
  if jax.process_index() == 0:
    write_results(results, out_dir)
    logging.info("wrote %s/{results.json,results.md,accuracy.png}\n%s", out_dir,
                 markdown_table(results))
  return results


def main() -> None:
  cli.run(run_eval)


if __name__ == "__main__":
  main()
