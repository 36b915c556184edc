r"""The benchmark: train step per bucket, MFU, the bucket mix, input pipeline, generation,
compile time scanned vs unrolled, and the PyTorch peer, measured in one process.

  python -m tokenflex_jax.bench --config=configs/bench.py --workdir=/tmp/bench \
      [--rounds=3] [--steps_per_round=4] [--nopeer] [--nolayouts] [--noreal_data] [--profile]
      [--only_real_data]

(or ``bash launch/bench.sh --out=DIR``). Prints one markdown table and writes
WORKDIR/bench.json and WORKDIR/bench.md; `tokenflex_jax.benchmarking.suite` says what
each figure is. The peer needs torch and transformers (requirements-test.txt).
"""

from __future__ import annotations

from absl import flags, logging

from tokenflex_jax.app import cli, config_checks, config_schema
from tokenflex_jax.benchmarking import report, suite


def run(config: config_schema.ConfigDict, workdir: str, options: suite.Options,
        only_real_data: bool = False) -> dict:
  """The binary's job: `suite.benchmark` (or its real-data section alone), then the
  report."""
  spec = config_schema.to_spec(config)
  # Before the workdir is written, data read or anything compiled.
  config_checks.check(spec, config_checks.TRAIN)
  if only_real_data:
    results = suite.real_data_only(spec, workdir, options)
    print(report.write_real_data(results, workdir))
    return results
  results = suite.benchmark(spec, workdir, options)
  print(report.write(results, workdir))
  logging.info("wrote %s/bench.json and bench.md", workdir)
  return results


def main() -> None:
  d = suite.Options
  rounds = flags.DEFINE_integer("rounds", d.rounds,
                                "Timed rounds per bucket (ours and the peer's alternate).")
  steps = flags.DEFINE_integer("steps_per_round", d.steps_per_round, "Timed steps per round.")
  warmup = flags.DEFINE_integer("warmup", d.warmup, "Untimed steps per bucket.")
  peer = flags.DEFINE_bool("peer", d.peer, "Time the PyTorch peer.")
  layouts = flags.DEFINE_bool("layouts", d.layouts, "Also compile and time the other layer "
                              "layout (scanned vs unrolled).")
  profile = flags.DEFINE_bool("profile", d.profile, "Trace the largest bucket's step into "
                              "WORKDIR/profile and report its time per XLA op.")
  new_tokens = flags.DEFINE_integer("new_tokens", d.new_tokens,
                                    "Generated tokens per generation call.")
  real = flags.DEFINE_bool("real_data", d.real_data, "Time packed against padded rows (and "
                           "the peer) on synthetic LLaVA rows.")
  only_real = flags.DEFINE_bool("only_real_data", False, "Measure the real-data section "
                                "alone (bench.json: the run's setup and real_data).")
  cli.run(lambda config, workdir: run(config, workdir, suite.Options(
      rounds=rounds.value, steps_per_round=steps.value, warmup=warmup.value, peer=peer.value,
      layouts=layouts.value, new_tokens=new_tokens.value, profile=profile.value,
      real_data=real.value), only_real.value))


if __name__ == "__main__":
  main()
