r"""Measures the train step of every visual-token bucket: time, throughput, FLOP rate.

  python -m tokenflex_jax.benchmark --config=configs/demo.py --workdir=/tmp/bench \
      [--config.lr_multipliers.vit=0] [--config.batch_size=16]

Builds the same per-bucket compiled steps as the trainer (random init, one real batch
from the pipeline), times ``steps`` calls per bucket after a warm-up, and prints a table
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

from tokenflex_jax import cli, setup, sharding
from tokenflex_jax.data import pipeline
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.training import steps

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


def benchmark(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{num_tokens: {"step_s", "examples_per_s", "gflop_per_step", "gflop_per_s_per_device"}}."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = setup.mesh_and_rules(config)
  tokenizer = setup.prepare_tokenizer(config, workdir)
  model = VLM(setup.model_config(config, tokenizer))
  counts = tuple(config.token_counts)
  transform = pipeline.make_transform(config.data, setup.tokenizer_loader(config, workdir))
  iterator = pipeline.make_iterator(pipeline.make_source(config.data), transform,
                                    config.batch_size, config.data.seed)
  local = next(iterator)
  abstract_batch, batch_sh = pipeline.abstract_batch(local, mesh, rules)
  batch = pipeline.to_global_batch(local, batch_sh)

  init_params = lambda rng: model.init(rng, batch["image"], batch["tokens"], counts[0])["params"]
  tx, step_fn, frozen = setup.optimizer_and_step(config, model, init_params)
  rng = jax.random.key(config.seed)
  with sharding.mesh_rules(mesh, rules):
    abstract_state, state_sh = steps.abstract_state_and_shardings(init_params, tx, rng, mesh,
                                                                  rules)
    state = steps.fresh_state(init_params, tx, rng, state_sh)
  compiled = steps.compile_per_bucket(step_fn, abstract_state, state_sh, abstract_batch,
                                      batch_sh, counts, mesh, rules)
  results = {}
  for n in counts:
    _, state = time_calls(compiled[n], state, batch, WARMUP_STEPS)
    times, state = time_calls(compiled[n], state, batch, TIMED_STEPS)
    step_s = float(np.median(times))
    flops = steps.compiled_flops(compiled[n])
    results[n] = {"step_s": step_s, "examples_per_s": config.batch_size / step_s,
                  "gflop_per_step": flops / 1e9,
                  "gflop_per_s_per_device": flops / step_s / 1e9}
  largest = results[max(counts)]["step_s"]
  lines = [f"train step, batch {config.batch_size}, frozen: {frozen or 'none'}, "
           f"{jax.device_count()} x {jax.devices()[0].device_kind}",
           "| visual tokens | step (ms) | examples/s | GFLOP/step | GFLOP/s/device | "
           f"time vs {max(counts)} |", "|---|---|---|---|---|---|"]
  for n, r in results.items():
    lines.append(f"| {n} | {1e3 * r['step_s']:.0f} | {r['examples_per_s']:.1f} | "
                 f"{r['gflop_per_step']:.2f} | {r['gflop_per_s_per_device']:.1f} | "
                 f"{r['step_s'] / largest:.2f} |")
  print("\n".join(lines))
  with open(os.path.join(workdir, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump({"batch_size": config.batch_size, "frozen": list(frozen),
               "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
               "results": {str(n): r for n, r in results.items()}}, f, indent=2)
  logging.info("wrote %s", os.path.join(workdir, "benchmark.json"))
  return results


def main() -> None:
  cli.run(benchmark)


if __name__ == "__main__":
  main()
