r"""Measures the train step of every visual-token bucket: time, throughput, FLOP rate.

  python -m tokenflex_jax.bench --config=configs/demo.py --workdir=/tmp/bench \
      [--config.lr_multipliers.vit=0] [--config.batch_size=16]

Builds the trainer's own per-bucket compiled steps (random init, one real batch from the
pipeline), measures this host's float32 and bfloat16 matmul rate, times ``TIMED_STEPS``
calls per bucket after a warm-up, and prints a table: step time, model FLOPs (the
formula of `tokenflex_jax.flops`) beside XLA's count, FLOP rate, MFU against the float32
rate, each bucket's cost relative to the largest. Writes WORKDIR/benchmark.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
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


def roofline_gflops(dtype: str, size: int = 2048, calls: int = 10) -> float:
  """This host's matmul rate: the median GFLOP/s of a [size, size] @ [size, size]
  product in ``dtype`` on the first device."""
  x = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(x))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(x))
    times.append(time.perf_counter() - t0)
  return 2 * size ** 3 / float(np.median(times)) / 1e9


def markdown(results: dict[int, dict[str, float]], title: str) -> str:
  largest = results[max(results)]["step_s"]
  lines = [title, "| visual tokens | step (ms) | examples/s | model GFLOP/step/device | "
           "XLA's count | GFLOP/s/device | MFU (f32 roofline) | "
           f"time vs {max(results)} |", "|---|---|---|---|---|---|---|---|"]
  for n, r in results.items():
    lines.append(f"| {n} | {1e3 * r['step_s']:.0f} | {r['examples_per_s']:.1f} | "
                 f"{r['gflop_per_step']:.2f} | {r['xla_gflop_per_step']:.2f} | "
                 f"{r['gflop_per_s_per_device']:.1f} | {r['mfu']:.2f} | "
                 f"{r['step_s'] / largest:.2f} |")
  return "\n".join(lines)


def benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{num_tokens: {"step_s", "examples_per_s", "gflop_per_step" (model FLOPs per device,
  `tokenflex_jax.flops`), "xla_gflop_per_step" (XLA's count, a scanned loop once),
  "gflop_per_s_per_device", "mfu"}}. MFU: the step's model FLOPs over all devices per
  second against this host's float32 matmul rate (simulated host devices share it)."""
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
  roofline = {d: roofline_gflops(d) for d in ("float32", "bfloat16")}
  flops = trainer.flops_per_device(task, job)
  results = {}
  for n, step in job.steps.items():
    _, state = time_calls(step, state, batch, WARMUP_STEPS)
    times, state = time_calls(step, state, batch, TIMED_STEPS)
    step_s = float(np.median(times))
    results[n] = {"step_s": step_s, "examples_per_s": config.batch_size / step_s,
                  "gflop_per_step": flops[n] / 1e9, "xla_gflop_per_step": step.flops / 1e9,
                  "gflop_per_s_per_device": flops[n] / step_s / 1e9,
                  "mfu": flops[n] * jax.device_count() / step_s / 1e9 / roofline["float32"]}
  print(markdown(results, f"train step, batch {config.batch_size}, frozen: "
                          f"{job.optimizer.frozen or 'none'}, {jax.device_count()} x "
                          f"{jax.devices()[0].device_kind}"))
  with open(os.path.join(workdir, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump({"batch_size": config.batch_size, "frozen": list(job.optimizer.frozen),
               "roofline_gflops": roofline,
               "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
               "results": {str(n): r for n, r in results.items()}}, f, indent=2)
  logging.info("wrote %s", os.path.join(workdir, "benchmark.json"))
  return results


def main() -> None:
  cli.run(benchmark)


if __name__ == "__main__":
  main()
