r"""Compiles a config's train step for every bucket from shapes alone; prints memory.

  python -m tokenflex_jax.aot --config=configs/paper.py:stage=3 --num_cpu_devices=64

No parameter is allocated: the state and batch are `jax.ShapeDtypeStruct`s with their
shardings, so a 7B model's step can be lowered and compiled for a 64-device mesh on a
laptop's CPU, to read XLA's per-device memory analysis before renting the pod. (On a
CPU the figures are the CPU compiler's; on TPU/GPU run it there for theirs.)
"""

from __future__ import annotations

import json
import sys

import jax
import ml_collections
from absl import app, flags

from tokenflex_jax import cli, config_checks, model_config, sharding
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.training import trainer
from tokenflex_jax.training.vlm_task import vlm_task


def compile_buckets(config: ml_collections.ConfigDict) -> dict[int, dict[str, float]]:
  """{num_tokens: {"compile_s", "gflop", "xla_gflop", "argument_gib", "output_gib",
  "temp_gib", "total_gib"}} per device, for the train step of each of
  ``config.token_counts``. ``gflop``: the model FLOPs (`tokenflex_jax.flops`);
  ``xla_gflop``: XLA's cost analysis, which counts a scanned loop's body once."""
  mesh, rules = sharding.mesh_from_config(config)
  model = VLM(model_config.vlm_config(config,
                                      model_config.FixedTokenIds(config.model.llm.vocab_size)))
  task = vlm_task(config, model, mesh, rules)
  job = trainer.compile_task(config, task, mesh, rules)
  gib = lambda b: b / 2**30
  out = {}
  for n, step in job.steps.items():
    mem = step.memory
    out[n] = {"compile_s": step.compile_seconds,
              "gflop": task.flops_per_step(n) / jax.device_count() / 1e9,
              "xla_gflop": step.flops / 1e9,
              "argument_gib": gib(mem.argument_size_in_bytes),
              "output_gib": gib(mem.output_size_in_bytes),
              "temp_gib": gib(mem.temp_size_in_bytes)}
    # Arguments are donated into the outputs, so they are not counted twice.
    out[n]["total_gib"] = max(out[n]["argument_gib"], out[n]["output_gib"]) + out[n]["temp_gib"]
  n_params = sum(x.size for x in jax.tree.leaves(job.abstract_state.params))
  print(f"{n_params / 1e9:.2f}B parameters; mesh {dict(mesh.shape)}; global batch "
        f"{config.batch_size}; frozen: {job.optimizer.frozen or 'none'}")
  print("| visual tokens | compile (s) | model GFLOP/step/device | XLA's count (a scanned "
        "loop once) | arguments GiB | temporaries GiB | total GiB/device |")
  print("|---|---|---|---|---|---|---|")
  for n, r in out.items():
    print(f"| {n} | {r['compile_s']:.0f} | {r['gflop']:.0f} | {r['xla_gflop']:.0f} | "
          f"{r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} |")
  sys.stdout.flush()
  return out


def main() -> None:
  config, _ = cli.define_flags(workdir_required=False)
  devices = flags.DEFINE_integer("num_cpu_devices", 0,
                                 "Simulate this many host CPU devices (0: the real devices).")
  out = flags.DEFINE_string("json_out", None, "Also write the figures here.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if devices.value:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", devices.value)
    # On the simulated mesh, before anything compiles.
    config_checks.check(config.value, devices.value or None, job="aot")
    results = compile_buckets(config.value)
    if out.value:
      with open(out.value, "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in results.items()}, f, indent=2)

  cli.run_main(run)


if __name__ == "__main__":
  main()
