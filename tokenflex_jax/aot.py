r"""Compiles a config's train step for every bucket from shapes alone; prints memory.

  python -m tokenflex_jax.aot --config=configs/paper.py:stage=3 --topology=v5e:8x8 \
      [--json_out=F]                                # the TPU compiler, on this host
  python -m tokenflex_jax.aot --config=configs/paper.py:stage=3 --num_cpu_devices=64

No parameter is allocated: the state and batch are `jax.ShapeDtypeStruct`s with their
shardings, so a 7B model's step can be lowered and compiled for a 64-chip mesh on a
laptop, to read the compiler's per-device memory analysis before renting the pod.
``--topology`` compiles for a Cloud TPU slice with the TPU compiler (libtpu,
requirements-tpu.txt) running on this host: the target's devices make the mesh, so
"auto" attention is splash, lowered by Mosaic for real; per bucket it also gives the
compiled FLOPs and bytes, a roofline bound on the step time from the chip's published
peak (`CHIPS`), and the compiler's own estimate of its kernels' time
(`benchmarking.tpu_cycles`); its memory is libtpu's own count, read from its log
(`benchmarking.tpu_memory`: PJRT's counts the heap's fragmentation twice).
``--num_cpu_devices`` uses the CPU compiler instead (its figures are a CPU's, not a
TPU's).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from tokenflex_jax import errors, model_config, sharding
from tokenflex_jax.app import cli, config_checks, config_schema
from tokenflex_jax.benchmarking import compile_profile, tpu_cycles, tpu_memory
from tokenflex_jax.models import layers
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import compiled, trainer
from tokenflex_jax.training.vlm_task import vlm_task

# Per chip: (peak dense bfloat16 FLOP/s, HBM bytes/s, HBM GiB), from Google Cloud's TPU
# pages (docs/performance.md cites them), and the clock (Hz): the peak over the MXUs'
# FLOPs per cycle (4, 8 and 16 times a 128 x 128 array's 32,768), by JAX's device_kind.
CHIPS = {
    "TPU v5 lite": (197e12, 819e9, 16, 197e12 / (4 * 32768)),    # v5e
    "TPU v5": (459e12, 2765e9, 95, 459e12 / (8 * 32768)),        # v5p
    "TPU v6 lite": (918e12, 1640e9, 32, 918e12 / (16 * 32768)),  # v6e (Trillium)
}


def compile_only_environment(topology: str) -> dict[str, str]:
  """The libtpu settings of a host that compiles for ``topology`` but runs nothing on it
  (no TPU, no metadata server, other compiles may run beside it): without them libtpu
  warns that it cannot find its accelerator and hosts, and holds a lock per machine."""
  env = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
         "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
  name, _, dims = topology.partition(":")
  chips = math.prod(int(d) for d in dims.split("x")) if re.fullmatch(r"\d+(x\d+)*", dims) else 0
  accelerator = {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}",
                 "v5p": f"v5p-{2 * chips}", "v4": f"v4-{2 * chips}"}.get(name)
  if accelerator and chips:
    env["TPU_ACCELERATOR_TYPE"] = accelerator
  return env


def tpu_devices(topology: str) -> list[jax.Device]:
  """The devices of a Cloud TPU topology (e.g. "v5e:8x8"), to compile for from any host
  (libtpu installed: requirements-tpu.txt); a name libtpu does not know is a
  `errors.ConfigError` naming the flag."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu's errors vary
    raise errors.ConfigError(f"--topology={topology}: {' '.join(str(e).split())[:300]} "
                             "(needs libtpu: pip install -r requirements-tpu.txt)") from None


def bucket_figures(config: config_schema.ConfigDict | RunSpec,
                   devices: list[jax.Device] | None = None,
                   log_dir: str | None = None,
                   profile: bool = False) -> dict[int, dict[str, float]]:
  """{num_tokens: {"compile_s", "gflop", "xla_gflop", "flops", "bytes_accessed",
  "argument_gib", "output_gib", "temp_gib", "total_gib"[, "pjrt_temp_gib",
  "roofline_step_s", "estimated_step_s"]}} per
  device, for the train step of each of ``config.token_counts`` compiled for ``devices``
  (default: this run's). ``gflop``/``flops``: the model FLOPs (`models.flops`);
  ``xla_gflop`` and ``bytes_accessed``: the compiler's cost analysis, which counts a
  scanned loop's body once. ``roofline_step_s`` (chips in `CHIPS`): max(FLOPs / peak,
  bytes / bandwidth), a lower bound on the step time (the bytes of the layer loop counted
  once make it lower still). ``estimated_step_s`` (chips in `CHIPS`): the TPU compiler's
  estimate of its own kernels' time (`tpu_cycles.estimated_cycles` at the chip's clock),
  without the Mosaic kernels and collectives. ``tpu_kernels`` (a TPU target): the Mosaic
  kernel calls in the compiled program (splash attention's). With ``log_dir`` (a TPU
  target's: the libtpu log directory set with `compile_profile.environment` before
  libtpu loaded) the memory is libtpu's own count (`tpu_memory.LibtpuMemory`: the
  temporaries its heap, the total the arguments plus its program's HBM; ``pjrt_temp_gib``
  for a step of one program: PJRT's temporaries, which a training log reports), and with
  ``profile`` each bucket's ``compile_profile``, where the TPU compiler's time went
  (`compile_profile.summary`)."""
  config = config_schema.to_spec(config)
  mesh, rules = sharding.mesh_from_config(config, devices)
  model = VLM(model_config.vlm_config(config,
                                      model_config.FixedTokenIds(config.model.llm.vocab_size)))
  task = vlm_task(config, model, mesh, rules)
  job = trainer.compile_task(config, task, mesh, rules,
                             tpu_memory.LibtpuMemory(log_dir) if log_dir else None)
  chip = CHIPS.get(mesh.devices.flat[0].device_kind)
  gib = lambda b: b / 2**30
  out = {}
  for n, step in job.steps.items():
    mem = step.memory
    flops = task.flops_per_step(n) / mesh.size
    out[n] = {"compile_s": step.compile_seconds, "gflop": flops / 1e9, "flops": flops,
              "xla_gflop": step.flops / 1e9,
              "bytes_accessed": compiled.cost_of(step.executable, "bytes accessed"),
              "argument_gib": gib(mem.argument_size_in_bytes),
              "output_gib": gib(mem.output_size_in_bytes),
              "temp_gib": gib(mem.temp_size_in_bytes)}
    out[n]["total_gib"] = gib(compiled.total_bytes(mem))
    programs = compiled.programs_of(step.executable)
    if log_dir and len(programs) == 1:  # What a training log on the TPU reports.
      out[n]["pjrt_temp_gib"] = gib(compiled.pjrt_memory(programs[0][0]).temp_size_in_bytes)
    if chip:
      out[n]["roofline_step_s"] = max(flops / chip[0], out[n]["bytes_accessed"] / chip[1])
    if mesh.devices.flat[0].platform == "tpu":  # Mosaic kernels (splash) in the program
      text = step.executable.as_text()
      out[n]["tpu_kernels"] = text.count("tpu_custom_call")
      cycles = [(tpu_cycles.estimated_cycles(program.as_text()), runs)
                for program, runs in compiled.programs_of(step.executable)]
      if chip and all(c is not None for c, _ in cycles):
        out[n]["estimated_step_s"] = sum(c * runs for c, runs in cycles) / chip[3]
  if profile:
    _attach_profiles(out, job, log_dir)
  n_params = sum(x.size for x in jax.tree.leaves(job.abstract_state.params))
  attention = layers.resolve_attention(config.model.attention, jnp.dtype(config.model.llm.dtype),
                                       mesh.devices.flat[0].platform)
  print(f"{n_params / 1e9:.2f}B parameters; mesh {dict(mesh.shape)} of "
        f"{mesh.devices.flat[0].device_kind}; attention {attention}; global batch "
        f"{config.batch_size}; frozen: {job.optimizer.frozen or 'none'}")
  print("| visual tokens | compile (s) | model GFLOP/step/device | XLA's count (a scanned "
        "loop once) | arguments GiB | temporaries GiB | total GiB/device | roofline step (s) | "
        "compiler's estimate, XLA's kernels (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for n, r in out.items():
    roof, est = (f"{r[k]:.2f}" if k in r else "-" for k in ("roofline_step_s",
                                                            "estimated_step_s"))
    print(f"| {n} | {r['compile_s']:.0f} | {r['gflop']:.0f} | {r['xla_gflop']:.0f} | "
          f"{r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} | {roof} | "
          f"{est} |")
  if profile:
    print("| visual tokens | kernels | kernel-seconds | longest kernel (s) | instructions "
          "(M) | threads / cores | seconds by part | projected compile (s) on 8 / 16 / 32 "
          "cores |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in out.items():
      p = r["compile_profile"]
      parts = "; ".join(f"{k} {v:.0f}" for k, v in p["by_part_s"].items())
      print(f"| {n} | {p['kernels']} | {p['kernel_s']:.0f} | {p['longest_kernel_s']:.1f} "
            f"({p['longest_kernel']}) | {p['instructions'] / 1e6:.2f} | {p['threads']} / "
            f"{p['host_cores']} | {parts} | "
            f"{' / '.join(f'{v:.0f}' for v in p['projected_s'].values())} |")
  sys.stdout.flush()
  return out


def _attach_profiles(out: dict[int, dict], job: trainer.CompiledTask, log_dir: str) -> None:
  """Adds each bucket's `compile_profile.summary` to ``out``: libtpu logged one program
  per bucket, in the order they were compiled."""
  compiles = compile_profile.read(log_dir)[-len(job.steps):]
  if len(compiles) != len(job.steps):
    raise errors.ConfigError(f"--compile_profile: libtpu's log in {log_dir} records "
                             f"{len(compiles)} programs for {len(job.steps)} buckets")
  for (n, step), record in zip(job.steps.items(), compiles):
    out[n]["compile_profile"] = compile_profile.summary(
        record, step.executable.as_text(), step.compile_seconds, len(os.sched_getaffinity(0)))


def main() -> None:
  config, _ = cli.define_flags(workdir_required=False)
  devices = flags.DEFINE_integer("num_cpu_devices", 0,
                                 "Simulate this many host CPU devices (0: the real devices).")
  topology = flags.DEFINE_string("topology", None, "Compile for this Cloud TPU topology with "
                                 "the TPU compiler on this host, e.g. v5e:8x8, v5p:4x4x4, "
                                 "v6e:8x8 (needs requirements-tpu.txt).")
  out = flags.DEFINE_string("json_out", None, "Also write the figures here.")
  profile = flags.DEFINE_bool("compile_profile", False, "With --topology: also where the "
                              "TPU compiler's time went, from libtpu's log (kernels, the "
                              "longest, seconds by part of the model, a projection for "
                              "more cores): docs/performance.md.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if devices.value and topology.value:
      raise app.UsageError("give --num_cpu_devices or --topology, not both")
    if profile.value and not topology.value:
      raise app.UsageError("--compile_profile reads the TPU compiler's log: give --topology")
    log_dir = tempfile.mkdtemp(prefix="tokenflex-tpu-log-") if topology.value else None
    if devices.value:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", devices.value)
    if topology.value:  # Before libtpu loads.
      for key, value in compile_only_environment(topology.value).items():
        os.environ.setdefault(key, value)
      os.environ.update(compile_profile.environment(
          log_dir, os.environ.get("LIBTPU_INIT_ARGS", "")))
    targets = tpu_devices(topology.value) if topology.value else None
    # On the target mesh, before anything compiles.
    spec = config_schema.to_spec(config_schema.loaded(config))
    config_checks.check(spec, config_checks.AOT,
                        len(targets) if targets else devices.value or None)
    if profile.value and spec.count_per_microbatch:
      raise app.UsageError("--compile_profile reads one program per bucket; "
                           "config.count_per_microbatch=True compiles several")
    results = bucket_figures(spec, targets, log_dir, profile.value)
    if log_dir:
      print(f"libtpu's log: {log_dir}")
    if out.value:
      with open(out.value, "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in results.items()}, f, indent=2)

  cli.run_main(run)


if __name__ == "__main__":
  main()
