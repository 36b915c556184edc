"""Benchmarks x budgets: one trained model evaluated on several VLMEvalKit benchmark TSVs
at every count of ``config.eval.token_counts``, and the paper-style table and plot.

Each benchmark is an ordinary evaluation (`evaluator.evaluate` with suite "vlmeval",
saved by `outputs.save` under WORKDIR/eval/<benchmark>/step_<N>/ with its predictions
files); the sweep then writes WORKDIR/eval/benchmarks/step_<N>/{table.md, table.json,
accuracy.png}: one row per benchmark, one column per count, each cell the benchmark's
headline in percent (`benchmark_set.headline`), and the average over the scored
benchmarks (MMVet has no rule-based score). Nothing is overwritten unless
``config.eval.overwrite``; every folder is checked before any work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from tokenflex_jax import paths, sharding, specs
from tokenflex_jax.app import config_checks, config_schema, trained_model
from tokenflex_jax.errors import UserError
from tokenflex_jax.evaluation import benchmark_set, benchmarks, outputs, report
from tokenflex_jax.evaluation.evaluator import evaluate

SUITE = "benchmarks"


def benchmark_files(folder: str) -> list[str]:
  """The TSVs in ``folder`` named as VLMEvalKit names a benchmark, in `BENCHMARKS` order."""
  names = {os.path.splitext(f)[0]: f for f in os.listdir(folder) if f.endswith(".tsv")}
  return [os.path.join(folder, names[b]) for b in benchmarks.BENCHMARKS if b in names]


def markdown(table: dict[str, Any]) -> str:
  counts = table["counts"]
  auto = any("auto" in row for row in table["benchmarks"].values())
  judged = table.get("needs_judge_share", {})
  lines = [f"Benchmarks at step {table['step']}, headline metric (%) per visual-token count, "
           "by VLMEvalKit's rules without a judge model (`--judge exact_matching`)"
           + ("; auto: the automatic budget at config.eval.auto_threshold (mean visual "
              "tokens, every attempt counted)." if auto else "."),
           "", "| benchmark | " + " | ".join(f"{c} tokens" for c in counts)
           + (" | auto |" if auto else " |"), "|---|" + "---|" * (len(counts) + auto)]
  cell = lambda v: "n/a" if v is None else f"{v:.1f}"
  for name, row in table["benchmarks"].items():
    extra = ""
    if auto:
      a = row.get("auto")
      extra = " n/a |" if a is None else f" {cell(a['value'])} ({a['mean_visual_tokens']:.0f}) |"
    mark = "†" if name in judged else ""
    lines.append(f"| {name}{mark} | " + " | ".join(cell(row[str(c)]) for c in counts) + " |"
                 + extra)
  lines.append("| **average** | " + " | ".join(
      f"**{cell(table['average'][str(c)])}**" for c in counts) + (" | |" if auto else " |"))
  for name, shares in judged.items():
    lines += ["", f"† {name}: the rows VLMEvalKit would send to its judge count as wrong, a "
              "lower bound of its judged score (their share: " + ", ".join(
                  f"{100 * shares[str(c)]:.0f}% at {c}" for c in counts) + ")."]
  return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: str) -> None:
  fig, ax = report.new_axes((6.4, 4.2))
  counts = table["counts"]
  for name, row in table["benchmarks"].items():
    points = [(c, row[str(c)]) for c in counts if row[str(c)] is not None]
    if points:
      ax.plot(*zip(*points), marker="o", label=name)
  report.save_figure(fig, ax, path, "visual tokens per image", "headline metric (%)")


def sweep(config: config_schema.ConfigDict | specs.RunSpec, workdir: str,
          files: Sequence[str]) -> dict[str, Any]:
  """Evaluates the workdir's model on each benchmark file; returns the table."""
  config = config_schema.to_spec(config)
  if not files:
    raise UserError("no benchmark files: name them as VLMEvalKit does (e.g. MMStar.tsv), "
                    f"one of {', '.join(benchmarks.BENCHMARKS)}")
  runs = {benchmarks.recognise(f): specs.replace(config, eval__suite="vlmeval",
                                                 eval__data_path=f, eval__benchmark="")
          for f in files}
  for spec in runs.values():
    config_checks.check(spec, config_checks.EVAL)
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules, config.eval.checkpoint_step)
  eval_root = os.path.join(workdir, "eval")
  out_dir = outputs.results_dir(eval_root, SUITE, trained.step)
  if (epath.Path(out_dir) / "table.json").exists() and not config.eval.overwrite:
    raise UserError(f"{out_dir} already holds a benchmark table at step {trained.step}; "
                    "pass --config.eval.overwrite=True to replace it")
  for name in runs:
    outputs.check_free(eval_root, name, trained.step, config.eval.overwrite)
  counts = [int(c) for c in config.eval.token_counts]
  table: dict[str, Any] = {"step": trained.step, "counts": counts, "benchmarks": {},
                           "needs_judge_share": {}}
  for name, spec in runs.items():
    results = evaluate(trained.model, trained.params, trained.tokenizer, spec, mesh, rules,
                       trained.step)
    outputs.save(eval_root, name, results, "sweep", spec.eval.overwrite)
    questions = results["examples_per_family"]
    row = {}
    for c in counts:
      value = benchmark_set.headline(results["results"][str(c)]["benchmark"], questions)
      row[str(c)] = None if math.isnan(value) else 100 * value
    auto = results.get("auto_budget", {}).get("configured")
    if auto is not None:
      row["auto"] = {"value": None if math.isnan(auto["accuracy"]) else 100 * auto["accuracy"],
                     "mean_visual_tokens": auto["mean_visual_tokens"]}
    table["benchmarks"][name] = row
    judge = {str(c): results["results"][str(c)]["benchmark"].get("needs_judge_share")
             for c in counts}
    if all(v is not None for v in judge.values()):  # MathVista's, scored by rules only
      table["needs_judge_share"][name] = judge
    logging.info("%s: %s", name, row)
  table["average"] = {}
  for c in counts:
    scored = [r[str(c)] for r in table["benchmarks"].values() if r[str(c)] is not None]
    table["average"][str(c)] = sum(scored) / len(scored) if scored else None
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths.write_atomically(os.path.join(out_dir, "table.json"),
                         json.dumps(table, indent=2).encode("utf-8"))
  paths.write_atomically(os.path.join(out_dir, "table.md"), markdown(table).encode("utf-8"))
  plot(table, os.path.join(out_dir, "accuracy.png"))
  return table
