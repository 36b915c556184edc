r"""Writes the reproduction's report from a `launch/reproduce.sh` workdir, or renders it
again from a results.json it wrote.

  python -m tokenflex_jax.report --workdir=workdirs/reproduce --out=docs \
      [--runs_revision=SHA] [--split=dev]
  python -m tokenflex_jax.report --from_json=docs/results.json --out=docs

Reads every evaluated variant and seed (see `studies.experiment`; with ``--split=dev``
their development evaluations alone) and writes
OUT/results.md, results.json, results_accuracy.png and results_budget.png. The summary
records this checkout's git revision (``revision.report``) and, given
``--runs_revision``, the one the runs trained at (``revision.runs``). ``--from_json``
recomputes every figure from the file's per-seed values (`experiment.restat`) with this
code, keeping what it says of the runs.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from absl import flags, logging

from tokenflex_jax import errors
from tokenflex_jax.app import cli
from tokenflex_jax.studies import experiment, experiment_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code a run executes (what its revision stands for).
CODE = ("tokenflex_jax", "configs", "launch")
CODE_NAMES = ", ".join(f"{d}/" for d in CODE[:-1]) + f" and {CODE[-1]}/"


def _git(*args: str, repo: str = REPO) -> str | None:
  try:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def code_revision(repo: str = REPO) -> dict[str, Any]:
  """{"report": the git checkout ``repo``'s HEAD (None outside git), "report_modified":
  whether the code (`CODE`) differs from it; reports and archived runs under docs/ do
  not count}."""
  head = _git("rev-parse", "HEAD", repo=repo)
  status = (_git("status", "--porcelain", "--untracked-files=no", "--", *CODE, repo=repo)
            if head else None)
  return {"report": head or None, "report_modified": bool(status)}


def short_revision(repo: str = REPO) -> str:
  """The revision reproduce.sh records for the runs it trains: the git checkout
  ``repo``'s short HEAD, "+uncommitted" appended where the code (`CODE`) differs from
  it; "unknown" outside git."""
  head = _git("rev-parse", "--short", "HEAD", repo=repo)
  if not head:
    return "unknown"
  return head + ("+uncommitted" if code_revision(repo)["report_modified"] else "")


def runs_note(runs_revision: str | None, repo: str = REPO) -> str | None:
  """For runs trained at several revisions ("a,b,c", oldest first): whether the code
  the runs execute (`CODE`) is the same at each as at the first, and else in which
  files it differs, from the git checkout ``repo``; None for one revision or where git
  cannot tell."""
  # "sha+uncommitted": the runs at sha with code changes not committed (`short_revision`).
  shas = [sha.removesuffix("+uncommitted") for sha in (runs_revision or "").split(",") if sha]
  if len(shas) < 2:
    return None
  files: set[str] = set()
  for sha in shas[1:]:
    changed = _git("diff", "--name-only", shas[0], sha, "--", *CODE, repo=repo)
    if changed is None:
      return None
    files.update(changed.split())
  return (f"{CODE_NAMES} identical at all of them" if not files else
          f"{CODE_NAMES} differ from the first in " + ", ".join(sorted(files)))


def _runs_fields(runs_revision: str | None) -> dict[str, Any]:
  """{"runs": the revisions, "runs_note": `runs_note` where it says something}."""
  note = runs_note(runs_revision)
  return {"runs": runs_revision or None, **({"runs_note": note} if note else {})}


def _publish(summary: dict, out: str, what: str) -> dict:
  experiment_report.write(summary, out, os.path.join(REPO, "docs"))
  logging.info("%s -> %s/results.md\n%s", what, out,
               "\n".join(experiment_report.verdict(summary)))
  return summary


def write_report(workdir: str, out: str, runs_revision: str | None = None,
                 split: str = "test") -> dict:
  """Summarizes ``workdir``'s runs on ``split``'s questions into ``out``; returns the
  summary (results.json)."""
  runs = experiment.collect(workdir, split)
  command_file = os.path.join(workdir, "command.txt")
  command = open(command_file, encoding="utf-8").read() if os.path.exists(command_file) else ""
  wall = sum(experiment.wall_times(workdir).values())
  summary = experiment.summarize(runs, command, wall,
                                 {**code_revision(), **_runs_fields(runs_revision)}, split)
  return _publish(summary, out, f"{len(runs)} runs of {len(summary['models'])} variants")


def render_json(path: str, out: str, runs_revision: str | None = None) -> dict:
  """Renders the results.json at ``path`` again into ``out`` (every figure recomputed
  from its per-seed values); returns the summary written."""
  if not os.path.exists(path):
    raise errors.MissingInputError(f"--from_json={path}: no such file")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  try:
    summary = experiment.restat(saved)
  except ValueError as e:
    raise errors.InputError(f"--from_json={path}: {e}") from None
  revision = {**saved.get("revision", {}), **code_revision()}
  if runs_revision:
    revision.pop("runs_note", None)
    revision.update(_runs_fields(runs_revision))
  return _publish({**summary, "revision": revision}, out, path)


def main() -> None:
  # Flags are defined when the binary starts, not at import (see `cli`).
  workdir = flags.DEFINE_string("workdir", None, "A launch/reproduce.sh workdir.")
  from_json = flags.DEFINE_string("from_json", None,
                                  "A results.json this binary wrote: render it again.")
  out = flags.DEFINE_string("out", "docs", "Directory for results.md, results.json, plots.")
  runs_revision = flags.DEFINE_string(
      "runs_revision", None, "The git revision the runs trained at (recorded as such).")
  split = flags.DEFINE_enum("split", "test", experiment.SPLITS,
                            "The questions to report: the test ones, or the development "
                            "ones alone (for choosing the recipe, never for claims).")
  flags.mark_flags_as_mutual_exclusive(["workdir", "from_json"], required=True)

  def run(argv) -> None:
    del argv
    if from_json.value:
      render_json(from_json.value, out.value, runs_revision.value)
    else:
      write_report(workdir.value, out.value, runs_revision.value, split.value)
  cli.run_main(run)


if __name__ == "__main__":
  main()
