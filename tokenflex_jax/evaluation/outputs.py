"""Where evaluation results live in a workdir, and the index of all of them.

Each evaluation of a workdir's checkpoint writes ``WORKDIR/eval/<suite>/step_<N>/``
(results.json, results.md, accuracy.png, budget.png; questions.npz, every question's
record; router.json, the router fitted on these questions, when two or more trained
counts were evaluated): ``<suite>`` is "scenes" for the
procedural suite and the data file's stem for an MMBench TSV or VQA JSONL, so
evaluations of different suites or checkpoints never land on each other.
``WORKDIR/eval/index.json`` lists them all: suite, step, folder, who wrote it (the eval
binary or a periodic evaluation during training) and the average accuracy per count.
The eval binary refuses to overwrite an evaluation unless ``config.eval.overwrite``.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

import numpy as np

from tokenflex_jax import paths
from tokenflex_jax.errors import MissingInputError, UserError
from tokenflex_jax.evaluation import report
from tokenflex_jax.specs import RunSpec

INDEX = "index.json"
QUESTIONS_FILE = "questions.npz"  # every question's record (`per_question`)
ROUTER_FILE = "router.json"  # in a step's folder and, saved for predict, in the workdir


def suite_name(config: RunSpec) -> str:
  """The folder of ``config.eval``'s suite: "scenes", or its data file's stem; with
  ``config.eval.tag`` T, that name + "_T" (the same suite evaluated another way, e.g. a
  development seed beside the test seed)."""
  if config.eval.suite == "scenes" or not config.eval.data_path:
    name = config.eval.suite
  else:
    name = os.path.splitext(os.path.basename(config.eval.data_path.rstrip("/")))[0]
  return f"{name}_{config.eval.tag}" if config.eval.tag else name


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


def per_question(prompts: np.ndarray, families: np.ndarray,
                 confidence: Mapping[int, np.ndarray], credit: Mapping[int, np.ndarray],
                 seconds: Mapping[int, float]) -> dict[str, np.ndarray]:
  """The arrays of questions.npz: prompts i32 [N, P] (left-padded), families str [N], and
  per evaluated count c: confidence_c [N] (the answer's mean token log-probability),
  credit_c [N] (its score in [0, 1]) and seconds_c (the sweep's mean seconds a question
  at c, the ViT's share included)."""
  out = {"prompts": np.asarray(prompts, np.int32), "families": np.asarray(families, str)}
  for c in confidence:
    out[f"confidence_{c}"] = np.asarray(confidence[c], np.float32)
    out[f"credit_{c}"] = np.asarray(credit[c], np.float32)
    out[f"seconds_{c}"] = np.float64(seconds[c])
  return out


def read_questions(path: str) -> dict[str, Any]:
  """questions.npz as {"prompts", "families", "counts": [int], "confidence": {c: [N]},
  "credit": {c: [N]}, "seconds": {c: float}}."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
    counts = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("credit_"))
    return {"prompts": z["prompts"], "families": z["families"], "counts": counts,
            "confidence": {c: z[f"confidence_{c}"].astype(np.float64) for c in counts},
            "credit": {c: z[f"credit_{c}"].astype(np.float64) for c in counts},
            "seconds": {c: float(z[f"seconds_{c}"]) for c in counts}}


# Parts of `evaluator.evaluate`'s results written to their own files, not results.json.
SIDE_FILES = ("predictions", "per_question", "router")


def results_json(results: Mapping[str, Any]) -> dict[str, Any]:
  """What `save` writes to results.json: ``results`` without its `SIDE_FILES` parts."""
  return {k: v for k, v in results.items() if k not in SIDE_FILES}


def save(eval_root: str, suite: str, results: dict[str, Any], source: str,
         overwrite: bool) -> str:
  """Writes ``results`` (of `evaluator.evaluate`) into its folder and the index: its
  `results_json` part to results.json, the rest to predictions_<count>.tsv,
  questions.npz and router.json; returns the folder (`check_free` first)."""
  step = int(results["step"])
  check_free(eval_root, suite, step, overwrite)
  out = results_dir(eval_root, suite, step)
  results = dict(results)
  for count, table in results.pop("predictions", {}).items():
    paths.write_atomically(os.path.join(out, f"predictions_{count}.tsv"), table.encode("utf-8"))
  if "per_question" in results:
    buf = io.BytesIO()
    np.savez_compressed(buf, **results.pop("per_question"))
    paths.write_atomically(os.path.join(out, QUESTIONS_FILE), buf.getvalue())
  if "router" in results:
    paths.write_atomically(os.path.join(out, ROUTER_FILE),
                           json.dumps(results.pop("router"), indent=1).encode("utf-8"))
  report.write_results(results_json(results), out)
  entry = {"suite": suite, "step": step, "dir": f"{suite}/step_{step}",
           "source": source,
           "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "average": {n: r["average"] for n, r in results["results"].items()}}
  entries = [e for e in read_index(eval_root) if (e["suite"], e["step"]) != (suite, step)]
  entries.append(entry)
  paths.write_atomically(os.path.join(eval_root, INDEX),
                         json.dumps({"evaluations": entries}, indent=1).encode("utf-8"))
  return out


def listed_results_file(eval_root: str, suite: str) -> str | None:
  """The results.json of ``suite``'s newest step listed in ``eval_root``'s index, or None."""
  steps = [e for e in read_index(eval_root) if e["suite"] == suite]
  if not steps:
    return None
  return os.path.join(eval_root, max(steps, key=lambda e: e["step"])["dir"], "results.json")


def latest_results_file(eval_root: str, suite: str) -> str:
  """The results.json of ``suite``'s newest evaluated step in ``eval_root`` (a workdir
  from before this layout: its ``eval/results.json``)."""
  listed = listed_results_file(eval_root, suite)
  if listed:
    return listed
  old = os.path.join(eval_root, "results.json")
  if epath.Path(old).exists():
    return old
  raise MissingInputError(f"no evaluation of {suite!r} in {eval_root} (no {INDEX})")
