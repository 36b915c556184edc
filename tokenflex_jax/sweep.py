r"""Evaluates a trained checkpoint on the paper's benchmarks at every visual-token count.

  python -m tokenflex_jax.sweep --workdir=/tmp/run --data_dir=BENCH_DIR \
      [--config.eval.token_counts='(64,144,256,576)'] [--config.eval.overwrite=True]

BENCH_DIR holds VLMEvalKit's TSVs under their names (MMStar.tsv, OCRBench.tsv, ...;
`evaluation/benchmarks.py`). Each is evaluated and saved as the eval binary saves it
(WORKDIR/eval/<benchmark>/step_<N>/, with predictions_<count>.tsv in VLMEvalKit's layout),
then WORKDIR/eval/benchmarks/step_<N>/{table.md,table.json,accuracy.png} holds one row
per benchmark and one column per count (`app.benchmark_sweep`). Without
``--config`` the workdir's own config is used, as by the eval binary.
"""

from __future__ import annotations

from absl import app, flags

from tokenflex_jax.app import cli, config_schema
from tokenflex_jax.app import benchmark_sweep


def main() -> None:
  config, workdir = cli.define_flags()
  data_dir = flags.DEFINE_string("data_dir", None, "Folder of VLMEvalKit benchmark TSVs.")
  flags.mark_flags_as_required(["data_dir"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    table = benchmark_sweep.sweep(config_schema.loaded(config), workdir.value,
                                  benchmark_sweep.benchmark_files(data_dir.value))
    print(benchmark_sweep.markdown(table))

  cli.run_main(run)


if __name__ == "__main__":
  main()
