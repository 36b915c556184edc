r"""Scores a predictions file against a benchmark's VLMEvalKit TSV, without a model.

  python -m tokenflex_jax.score --data=MMStar.tsv --predictions=PRED.tsv \
      [--benchmark=MMStar] [--json_out=F]

PRED.tsv: VLMEvalKit's layout, the benchmark's question columns (images left out) plus
``prediction``; rows are matched by ``index``, and every benchmark row needs one. The
benchmark is named by --benchmark or by the data file's name (`benchmarks.BENCHMARKS`).
Prints and writes ``{"benchmark": NAME, <VLMEvalKit's metric names>: value, ...}``
(`benchmarks.score`; the rules: docs/benchmarks.md).
"""

from __future__ import annotations

import json

from absl import app, flags

from tokenflex_jax import entry
from tokenflex_jax.evaluation import benchmarks


def main() -> None:
  data = flags.DEFINE_string("data", None, "The benchmark's TSV (VLMEvalKit's layout).")
  predictions = flags.DEFINE_string("predictions", None, "TSV of index and prediction.")
  benchmark = flags.DEFINE_string("benchmark", "", "The benchmark, if the data file's name "
                                  f"does not say: one of {', '.join(benchmarks.BENCHMARKS)}.")
  json_out = flags.DEFINE_string("json_out", None, "Also write the figures here.")
  flags.mark_flags_as_required(["data", "predictions"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = benchmarks.score_files(data.value, predictions.value, benchmark.value)
    text = json.dumps(result, indent=2)
    print(text)
    if json_out.value:
      with open(json_out.value, "w", encoding="utf-8") as f:
        f.write(text + "\n")

  entry.run(run)


if __name__ == "__main__":
  main()
