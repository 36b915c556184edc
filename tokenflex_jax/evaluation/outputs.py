"""Where evaluation results live in a workdir, and the index of all of them.

Each evaluation of a workdir's checkpoint writes ``WORKDIR/eval/<suite>/step_<N>/``
(results.json, results.md, accuracy.png, budget.png): ``<suite>`` is "scenes" for the
procedural suite and the data file's stem for an MMBench TSV or VQA JSONL, so
evaluations of different suites or checkpoints never land on each other.
``WORKDIR/eval/index.json`` lists them all: suite, step, folder, who wrote it (the eval
binary or a periodic evaluation during training) and the average accuracy per count.
The eval binary refuses to overwrite an evaluation unless ``config.eval.overwrite``.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from etils import epath

from tokenflex_jax import paths
from tokenflex_jax.errors import MissingInputError, UserError
from tokenflex_jax.evaluation import report
from tokenflex_jax.specs import RunSpec

INDEX = "index.json"


def suite_name(config: RunSpec) -> str:
  """The folder of ``config.eval``'s suite: "scenes", or its data file's stem."""
  if config.eval.suite == "scenes" or not config.eval.data_path:
    return config.eval.suite
  return os.path.splitext(os.path.basename(config.eval.data_path.rstrip("/")))[0]


def results_dir(eval_root: str, suite: str, step: int) -> str:
  return os.path.join(eval_root, suite, f"step_{step}")


def read_index(eval_root: str) -> list[dict[str, Any]]:
  """The index's entries ([] when there is none yet), oldest first."""
  path = epath.Path(eval_root) / INDEX
  if not path.exists():
    return []
  return json.loads(path.read_text())["evaluations"]


def check_free(eval_root: str, suite: str, step: int, overwrite: bool) -> None:
  """Raises `UserError` if ``suite`` at ``step`` was evaluated already and not
  ``overwrite`` (the eval binary asks before it evaluates)."""
  out = results_dir(eval_root, suite, step)
  if (epath.Path(out) / "results.json").exists() and not overwrite:
    raise UserError(f"{out} already holds an evaluation of {suite!r} at step {step}; pass "
                    f"--config.eval.overwrite=True to replace it")


def save(eval_root: str, suite: str, results: dict[str, Any], source: str,
         overwrite: bool) -> str:
  """Writes ``results`` (of `evaluator.evaluate`) into its folder and the index; returns
  the folder (`check_free` first)."""
  step = int(results["step"])
  check_free(eval_root, suite, step, overwrite)
  out = results_dir(eval_root, suite, step)
  results = dict(results)
  for count, table in results.pop("predictions", {}).items():
    paths.write_atomically(os.path.join(out, f"predictions_{count}.tsv"), table.encode("utf-8"))
  report.write_results(results, out)
  entry = {"suite": suite, "step": step, "dir": f"{suite}/step_{step}",
           "source": source,
           "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "average": {n: r["average"] for n, r in results["results"].items()}}
  entries = [e for e in read_index(eval_root) if (e["suite"], e["step"]) != (suite, step)]
  entries.append(entry)
  paths.write_atomically(os.path.join(eval_root, INDEX),
                         json.dumps({"evaluations": entries}, indent=1).encode("utf-8"))
  return out


def latest_results_file(eval_root: str, suite: str) -> str:
  """The results.json of ``suite``'s newest evaluated step in ``eval_root`` (a workdir
  from before this layout: its ``eval/results.json``)."""
  steps = [e for e in read_index(eval_root) if e["suite"] == suite]
  if steps:
    newest = max(steps, key=lambda e: e["step"])
    return os.path.join(eval_root, newest["dir"], "results.json")
  old = os.path.join(eval_root, "results.json")
  if epath.Path(old).exists():
    return old
  raise MissingInputError(f"no evaluation of {suite!r} in {eval_root} (no {INDEX})")
