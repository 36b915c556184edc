r"""Writes the reproduction's report from a `launch/reproduce.sh` workdir.

  python -m tokenflex_jax.report --workdir=workdirs/reproduce --out=docs

Reads every evaluated variant and seed (see `evaluation.experiment`) and writes
OUT/results.md, results.json, results_accuracy.png and results_budget.png.
"""

from __future__ import annotations

import os

from absl import flags, logging

from tokenflex_jax import cli
from tokenflex_jax.evaluation import experiment, experiment_report

def write_report(workdir: str, out: str) -> dict:
  """Summarizes ``workdir``'s runs into ``out``; returns the summary (results.json)."""
  runs = experiment.collect(workdir)
  command_file = os.path.join(workdir, "command.txt")
  command = open(command_file, encoding="utf-8").read() if os.path.exists(command_file) else ""
  wall = sum(experiment.wall_times(workdir).values())
  summary = experiment.summarize(runs, command, wall)
  experiment_report.write(summary, out)
  logging.info("%d runs of %d variants -> %s/results.md\n%s", len(runs),
               len(summary["models"]), out, "\n".join(experiment_report.verdict(summary)))
  return summary


def main() -> None:
  # Flags are defined when the binary starts, not at import (see `cli`).
  workdir = flags.DEFINE_string("workdir", None, "A launch/reproduce.sh workdir.",
                                required=True)
  out = flags.DEFINE_string("out", "docs", "Directory for results.md, results.json, plots.")
  def run(argv) -> None:
    del argv
    write_report(workdir.value, out.value)
  cli.run_main(run)


if __name__ == "__main__":
  main()
