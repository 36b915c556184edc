r"""The benchmark: train step per bucket, MFU, the bucket mix, input pipeline, generation,
compile time scanned vs unrolled, and the PyTorch peer, measured in one process.

  python -m tokenflex_jax.bench --config=configs/bench.py --workdir=/tmp/bench \
      [--rounds=3] [--steps_per_round=4] [--nopeer] [--nolayouts] [--profile]

(or ``bash launch/bench.sh --out=DIR``). Prints one markdown table and writes
WORKDIR/bench.json and WORKDIR/bench.md; `tokenflex_jax.benchmarking.suite` says what
each figure is. The peer needs torch and transformers (requirements-test.txt).
"""

from __future__ import annotations

from absl import flags, logging

from tokenflex_jax import cli
from tokenflex_jax.benchmarking import report, suite

_ROUNDS = flags.DEFINE_integer("rounds", suite.Options.rounds,
                               "Timed rounds per bucket (ours and the peer's alternate).")
_STEPS = flags.DEFINE_integer("steps_per_round", suite.Options.steps_per_round,
                              "Timed steps per round.")
_WARMUP = flags.DEFINE_integer("warmup", suite.Options.warmup, "Untimed steps per bucket.")
_PEER = flags.DEFINE_bool("peer", suite.Options.peer, "Time the PyTorch peer.")
_LAYOUTS = flags.DEFINE_bool("layouts", suite.Options.layouts,
                             "Also compile and time the other layer layout (scanned vs "
                             "unrolled).")
_PROFILE = flags.DEFINE_bool("profile", suite.Options.profile,
                             "Trace the largest bucket's step into WORKDIR/profile and "
                             "report its time per XLA op.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", suite.Options.new_tokens,
                                   "Generated tokens per generation call.")


def run(config, workdir: str) -> dict:
  """The binary's job: `suite.benchmark` with the flags' options, then the report."""
  options = suite.Options(rounds=_ROUNDS.value, steps_per_round=_STEPS.value,
                          warmup=_WARMUP.value, peer=_PEER.value, layouts=_LAYOUTS.value,
                          new_tokens=_NEW_TOKENS.value, profile=_PROFILE.value)
  results = suite.benchmark(config, workdir, options)
  print(report.write(results, workdir))
  logging.info("wrote %s/bench.json and bench.md", workdir)
  return results


def main() -> None:
  cli.run(run)


if __name__ == "__main__":
  main()
