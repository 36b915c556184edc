r"""Measures the train step of every visual-token bucket: time, throughput, FLOP rate.

  python -m tokenflex_jax.bench --config=configs/demo.py --workdir=/tmp/bench \
      [--config.lr_multipliers.vit=0] [--config.batch_size=16]

Builds the trainer's own per-bucket compiled steps (random init, one real batch from the
pipeline), times ``TIMED_STEPS`` calls per bucket after a warm-up, and prints a table
with each bucket's cost relative to the largest one. Writes WORKDIR/benchmark.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from tokenflex_jax import cli, model_config, run_tokenizer, sharding
from tokenflex_jax.data import pipeline
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.training import compiled, steps, trainer
from tokenflex_jax.training.vlm_task import vlm_task

TIMED_STEPS = 10
WARMUP_STEPS = 2


def time_calls(fn, state, batch, calls: int) -> tuple[list[float], object]:
  """Seconds per call of ``state = fn(state, batch)[0]``, each call waited for."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return times, state


def markdown(results: dict[int, dict[str, float]], title: str) -> str:
  largest = results[max(results)]["step_s"]
  lines = [title, "| visual tokens | step (ms) | examples/s | GFLOP/step | GFLOP/s/device | "
           f"time vs {max(results)} |", "|---|---|---|---|---|---|"]
  for n, r in results.items():
    lines.append(f"| {n} | {1e3 * r['step_s']:.0f} | {r['examples_per_s']:.1f} | "
                 f"{r['gflop_per_step']:.2f} | {r['gflop_per_s_per_device']:.1f} | "
                 f"{r['step_s'] / largest:.2f} |")
  return "\n".join(lines)


def benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{num_tokens: {"step_s", "examples_per_s", "gflop_per_step", "gflop_per_s_per_device"}}."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = sharding.mesh_from_config(config)
  tokenizer = run_tokenizer.prepare(config, workdir)
  model = VLM(model_config.vlm_config(config, tokenizer))
  task = vlm_task(config, model, mesh, rules, run_tokenizer.loader(config, workdir))
  batch = pipeline.to_global_batch(next(task.data_from(0)),
                                   compiled.shardings_of(dict(task.abstract_batch)))
  job = trainer.compile_task(config, task, mesh, rules)
  state = steps.random_state(task.init_params, job.optimizer.tx, jax.random.key(config.seed),
                             job.state_shardings, mesh, rules)
  results = {}
  for n, step in job.steps.items():
    _, state = time_calls(step, state, batch, WARMUP_STEPS)
    times, state = time_calls(step, state, batch, TIMED_STEPS)
    step_s = float(np.median(times))
    results[n] = {"step_s": step_s, "examples_per_s": config.batch_size / step_s,
                  "gflop_per_step": step.flops / 1e9,
                  "gflop_per_s_per_device": step.flops / step_s / 1e9}
  print(markdown(results, f"train step, batch {config.batch_size}, frozen: "
                          f"{job.optimizer.frozen or 'none'}, {jax.device_count()} x "
                          f"{jax.devices()[0].device_kind}"))
  with open(os.path.join(workdir, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump({"batch_size": config.batch_size, "frozen": list(job.optimizer.frozen),
               "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
               "results": {str(n): r for n, r in results.items()}}, f, indent=2)
  logging.info("wrote %s", os.path.join(workdir, "benchmark.json"))
  return results


def main() -> None:
  cli.run(benchmark)


if __name__ == "__main__":
  main()
