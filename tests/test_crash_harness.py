"""The crash harness, short version: 2 SIGKILLs of a tiny run (one aimed at an
asynchronous save), restarts, and a bit-identical comparison with an uninterrupted run.
Every program is kept in the compilation cache (the tiny ones compile in under its 1 s
threshold), so each restart runs the steps its first start compiled."""

import subprocess
import sys

import numpy as np

from tests.tiny import TINY_FLAGS
from tests.xla_env import REPO, binary_env
from tokenflex_jax.studies import crash_harness

ONE_BUCKET = ("--config.token_counts=(64,)", "--config.token_probs=(1.0,)",
              "--config.eval.token_counts=(64,)")


def test_two_kills_leave_a_bit_identical_run(tmp_path):
  tiny = [f for f in TINY_FLAGS if "token_counts" not in f and "token_probs" not in f]
  command = [sys.executable, "-m", "tokenflex_jax.crash_test", f"--workdir={tmp_path}",
             "--kills=2", "--total_steps=10", "--checkpoint_every=2", "--seed=3", "--",
             *tiny, *ONE_BUCKET]
  env = binary_env(8, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  out = result.stdout.strip().splitlines()
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert out[-1].startswith("2 kills (") and out[-1].endswith("during a save): bit-identical=true")
  assert int(out[-1].split("(")[1].split()[0]) >= 1, out  # the aimed kill hit a save
  # The restarts really resumed: each kill line names the committed step, and the log
  # has one "resumed from" per restart after a commit.
  log = (tmp_path / "killed.log").read_text()
  assert "resumed from" in log and "the temporary directory of a save that did not finish" in log
  # The restarts loaded their train step from the compilation cache of the workdir.
  hits = [l for l in log.splitlines() if "Persistent compilation cache hit for" in l]
  assert any("jit__lambda" in l for l in hits), log[-3000:]
  assert any((tmp_path / "killed" / "compilation_cache").iterdir())
  # The comparison itself can fail: one flipped bit is a difference.
  a = {"w": np.arange(4, dtype=np.float32)}
  b = {"w": a["w"].copy()}
  assert crash_harness._identical(a, b)  # pylint: disable=protected-access
  b["w"].view(np.uint32)[2] ^= 1
  assert not crash_harness._identical(a, b)  # pylint: disable=protected-access
