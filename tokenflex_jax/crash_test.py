r"""The crash harness: SIGKILL a training run N times (some kills inside an asynchronous
save), restart it each time, and compare with an uninterrupted run.

  python -m tokenflex_jax.crash_test --workdir=/tmp/crash [--kills=10] \
      [--config=configs/demo.py] [--total_steps=40] [--checkpoint_every=4] [-- TRAIN FLAGS]

(or ``bash launch/crash_test.sh``). The last line reads
``N kills (M during a save): bit-identical=true|false``; the exit status is 0 only when
the final parameters, the optimizer state and the loss history are bit-identical and
no restart lost a committed step. `tokenflex_jax.studies.crash_harness` says how.
"""

from __future__ import annotations

import sys

from absl import flags

from tokenflex_jax.app import cli
from tokenflex_jax.studies import crash_harness

def main() -> None:
  workdir = flags.DEFINE_string("workdir", None, "An empty folder for both runs and the log.",
                                required=True)
  kills = flags.DEFINE_integer("kills", 10, "SIGKILLs of the killed run (every other one "
                               "aimed at an asynchronous save).")
  config = flags.DEFINE_string("config", "configs/demo.py", "The train binary's --config.")
  total = flags.DEFINE_integer("total_steps", 40, "Steps of both runs.")
  every = flags.DEFINE_integer("checkpoint_every", 4, "Checkpoint cadence of both runs.")
  seed = flags.DEFINE_integer("seed", 0, "Draws the kill moments.")

  def run(argv: list[str]) -> None:
    train_flags = [f"--config.total_steps={total.value}",
                   f"--config.checkpoint_every={every.value}", "--config.log_every=1",
                   f"--config.keep_checkpoints={kills.value + 2}", *argv[1:]]
    if kills.value < 1:
      raise flags.ValidationError("--kills must be at least 1")
    result = crash_harness.run(crash_harness.default_command(config.value, train_flags),
                               workdir.value, kills.value, total.value, seed=seed.value)
    print(result.summary(), flush=True)
    sys.exit(0 if result.bit_identical else 1)

  cli.run_main(run)


if __name__ == "__main__":
  main()
