r"""The prepared GPU check: versions, the bf16 matmul rate, attention per implementation,
and the benchmark with the PyTorch peer, in one process (`tokenflex_jax.benchmarking.gpu`).

  python -m tokenflex_jax.gpu_check --config=configs/gpu_bench.py:size=1b --workdir=DIR
  python -m tokenflex_jax.gpu_check --config=configs/gpu_bench.py:size=tiny \
      --workdir=DIR --dry        # the same path on a CPU at tiny shapes (CI)

(``bash launch/gpu_check.sh [--dry] [--out=DIR]`` sets up and runs it). Writes
DIR/gpu.json after each section and DIR/gpu.md at the end, and prints the
markdown.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from absl import flags, logging

from tokenflex_jax import specs
from tokenflex_jax.app import cli, config_checks, config_schema
from tokenflex_jax.benchmarking import gpu, suite, timing

SAVE_EVERY_S = 10.0



def options(dry: bool) -> tuple[suite.Options, gpu.AttentionShape, int, int]:
  """(bench options, attention shape, matmul size, timed calls) for a real or dry run."""
  if dry:
    return (suite.Options(rounds=1, steps_per_round=1, warmup=1, layouts=False, new_tokens=2,
                          pipeline_batches=1, roofline_size=256, peer_failure_ok=True,
                          real_data=False),
            gpu.DRY_ATTENTION, 256, 2)
  return (suite.Options(rounds=3, steps_per_round=4, warmup=2, layouts=False, new_tokens=32,
                        pipeline_batches=10, roofline_size=8192, peer_failure_ok=True,
                        first_loss_every_bucket=False, real_data=False),
          gpu.FULL_ATTENTION, 8192, 10)


def run(config: config_schema.ConfigDict, workdir: str, dry: bool) -> dict[str, Any]:
  """The binary's job: every section of `gpu` into WORKDIR/gpu.json, then gpu.md."""
  config = config_schema.to_spec(config)
  # Before the workdir is written or anything measured.
  config_checks.check(config, config_checks.TRAIN)
  bench_options, shape, size, calls = options(dry)
  os.makedirs(workdir, exist_ok=True)
  results: dict[str, Any] = {"dry": dry}

  lock = threading.Lock()

  def save() -> None:
    """Writes gpu.json (whole: a new file renamed over the old)."""
    with lock:
      try:
        text = json.dumps(results, indent=2, default=str)
      except RuntimeError:  # a section grew the results meanwhile: the next save has them
        return
      path = os.path.join(workdir, "gpu.json")
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(path + ".tmp", path)

  # Also every few seconds during a section, so a run stopped at its time limit keeps
  # the buckets measured so far.
  done = threading.Event()

  def autosave() -> None:
    while not done.wait(SAVE_EVERY_S):
      save()

  threading.Thread(target=autosave, daemon=True).start()

  def matmul(into: dict[str, Any]) -> None:
    into.update(size=size, bf16_tflops=timing.roofline_gflops("bfloat16", size, calls) / 1e3)

  gpu.run_sections({
      "versions": lambda into: into.update(gpu.versions()),
      "matmul": matmul,
      "attention": lambda into: into.update(gpu.attention_check(shape, calls)),
      # The bench's own files (its tokenizer) go to a scratch folder: WORKDIR holds the
      # report alone (a lent machine hands back a few files only).
      "bench": lambda into: suite.benchmark(config, tempfile.mkdtemp(prefix="gpu_check_"),
                                            bench_options, out=into),
  }, results, save)
  if "error" in results["bench"] and config.model.attention != "xla":
    # One more chance for the step's figures: XLA's attention instead of the one "auto"
    # chose (cuDNN on a GPU), whose failure the bench section recorded.
    fallback = specs.replace(config, model__attention="xla")
    gpu.run_sections({"bench_xla": lambda into: suite.benchmark(
        fallback, tempfile.mkdtemp(prefix="gpu_check_"), bench_options, out=into)},
                     results, save)
  done.set()
  text = gpu.markdown(results)
  with open(os.path.join(workdir, "gpu.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)
  logging.info("wrote %s/gpu.json and gpu.md", workdir)
  return results


def main() -> None:
  dry = flags.DEFINE_bool("dry", False, "Tiny shapes and one timed step each: the check's "
                          "code path on a CPU, in seconds.")
  cli.run(lambda config, workdir: run(config, workdir, dry.value))


if __name__ == "__main__":
  main()
