"""Evaluation during training: the eval binary's evaluation of the live parameters.

`make_periodic_eval` returns the ``(params, step) -> scalars`` a training `Task` runs
every ``config.eval_every`` steps: `evaluator.evaluate` at ``config.eval.token_counts``,
its files (results.json / .md / accuracy.png) under
``EVAL_DIR/<suite or data file stem>/step_<step>/`` with an entry in the index
(`outputs`), and per count the average and each
family's accuracy as scalars ``eval/<N>tokens/<family>`` for TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.evaluation import evaluator, outputs, report
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
  """{"eval/<N>tokens/average": a, "eval/<N>tokens/<family>": a, ...} of `evaluate`'s
  results."""
  out = {}
  for count, result in results["results"].items():
    out[f"eval/{count}tokens/average"] = float(result["average"])
    out.update({f"eval/{count}tokens/{family}": float(value)
                for family, value in result["families"].items()})
  return out


def make_periodic_eval(model: VLM, load_tokenizer: Callable[[], ChatTokenizer],
                       config: RunSpec, mesh, rules, eval_dir: str
                       ) -> Callable[[Any, int], dict[str, float]]:
  """The ``(params, step) -> scalars`` of the module docstring (every process calls it)."""

  def evaluate(params: Any, step: int) -> dict[str, float]:
    results = evaluator.evaluate(model, params, load_tokenizer(), config, mesh, rules, step)
    out_dir = outputs.results_dir(eval_dir, outputs.suite_name(config), step)
    if jax.process_index() == 0:  # A step redone after a restart evaluates the same.
      outputs.save(eval_dir, outputs.suite_name(config), results, "periodic", overwrite=True)
    logging.info("periodic evaluation at step %d -> %s\n%s", step, out_dir,
                 report.markdown_table(results))
    return scalars(results)

  return evaluate
