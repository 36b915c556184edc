"""The whole benchmark, measured in one process (`tokenflex_jax.bench` is its binary).

1. this host's matmul roofline, float32 and bfloat16;
2. per bucket: the trainer's own compiled step (random init, one real batch), median
   step time over rounds after a warm-up, model FLOPs (`models.flops`) beside
   XLA's count, MFU against the roofline of the model's compute dtype, the step's
   memory per device (the compiler's analysis, and the device's peak where it keeps one);
3. the config's bucket mix (the paper's 2:3:5) as the mean step time it implies,
   against the largest bucket's;
4. the input pipeline alone (examples/s) against what the fastest step consumes;
5. generation at the largest bucket: new tokens/s with the KV cache and recomputing;
6. compile time per bucket, the layers scanned and unrolled (and the unrolled step time);
7. the PyTorch peer (`torch_peer`) on the torch device beside JAX's, started from the
   same parameters, its step time per bucket in rounds interleaved with ours;
8. real data (`real_data`): useful tokens/s of packed against padded rows and the peer's
   LLaVA-style batches, on the same synthetic LLaVA rows;
and, if asked, a profile of the largest bucket's step (`profile`: time per XLA op).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from tokenflex_jax import model_config, sharding, specs
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.benchmarking import decode_speed, profile, real_data, timing
from tokenflex_jax.data import pipeline, scenes
from tokenflex_jax.evaluation.generate import encode_prompts
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import compiled, steps, trainer
from tokenflex_jax.training.vlm_task import vlm_task


@dataclasses.dataclass(frozen=True)
class Options:
  """How much to measure. rounds x steps_per_round timed steps per bucket (ours and the
  peer's alternate round by round, so a drift of the host's speed hits both), after
  ``warmup`` untimed ones; ``peer``: run the PyTorch peer; ``layouts``: also compile
  (and time) the other layer layout, scanned vs unrolled; ``new_tokens``: generation
  length; ``pipeline_batches``: batches the input pipeline is timed on; ``profile``:
  trace the largest bucket's step (WORKDIR/profile) and sum its time per XLA op;
  ``roofline_size``: the side of the roofline's square matmuls; ``peer_failure_ok``: a
  failure of the peer (another framework's stack) is recorded as ``peer_error`` and the
  rest measured without it, instead of stopping the benchmark;
  ``first_loss_every_bucket``: compare both models' first loss at every bucket (each a
  compile of the loss), else at the largest only; ``real_data``: the real-data section
  (`real_data`: packed against padded rows and the peer, on LLaVA rows)."""
  rounds: int = 3
  steps_per_round: int = 4
  warmup: int = 2
  peer: bool = True
  layouts: bool = True
  new_tokens: int = 32
  pipeline_batches: int = 20
  profile: bool = False
  roofline_size: int = 2048
  peer_failure_ok: bool = False
  first_loss_every_bucket: bool = True
  real_data: bool = True


@dataclasses.dataclass
class Setup:
  """One layer layout's compiled train steps and a state for them."""
  task: trainer.Task
  job: trainer.CompiledTask
  state: Any


def setup(config: RunSpec, model: VLM, mesh, rules, tokenizer_loader
           ) -> Setup:
  task = vlm_task(config, model, mesh, rules, tokenizer_loader)
  job = trainer.compile_task(config, task, mesh, rules)
  state = steps.random_state(task.init_params, job.optimizer.tx, jax.random.key(config.seed),
                             job.state_shardings, mesh, rules)
  return Setup(task, job, state)


def _with_layout(config: RunSpec, scan: bool) -> RunSpec:
  return specs.replace(config, model__scan_layers=scan)


def pipeline_rate(task: trainer.Task, batch_size: int, batches: int) -> float:
  """Examples/s of the input pipeline alone (host-local batches, after the first)."""
  data = task.data_from(0)
  next(data)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(data)
  return batches * batch_size / (time.perf_counter() - t0)


def decode_rates(config: RunSpec, model: VLM, params: Any, tokenizer,
                 images: np.ndarray, num_tokens: int, new_tokens: int, calls: int
                 ) -> dict[str, float]:
  """New tokens/s of greedy decoding with the KV cache and recomputing, and whether both
  decoded the same ids, on the eval suite's prompts for ``images`` [B, H, W, 3]."""
  questions = [scenes.generate_example(config.eval.seed, i, image_size=config.data.image_size,
                                       families=tuple(config.data.families))["question"]
               for i in range(images.shape[0])]
  prompts = encode_prompts(tokenizer, questions, config.eval.max_prompt_length,
                           config.data.image_first)
  cached, recompute = decode_speed.cached_and_recomputed(model, new_tokens)
  out = {}
  ids = {}
  for name, fn in (("cache", cached), ("recompute", recompute)):
    ids[name] = np.asarray(fn(params, images, prompts, num_tokens))  # compiles
    seconds = timing.Timing.of(timing.time_calls(
        lambda fn=fn: fn(params, images, prompts, num_tokens), calls)).median
    out[f"{name}_tokens_per_s"] = images.shape[0] * new_tokens / seconds
  out["speedup"] = out["cache_tokens_per_s"] / out["recompute_tokens_per_s"]
  out["same_ids"] = bool(np.array_equal(ids["cache"], ids["recompute"]))
  return out


@dataclasses.dataclass
class Peer:
  """The PyTorch peer, its optimizer and our batch on its device."""
  model: Any
  opt: Any
  batch: Any
  clip_norm: float

  def times(self, num_tokens: int, warmup: int, calls: int) -> list[float]:
    return torch_peer().step_times(self.model, self.opt, self.batch, num_tokens,
                                   self.clip_norm, warmup, calls)


def torch_peer():
  """`tokenflex_jax.benchmarking.torch_peer`, imported when first used: a bench-only
  dependency (torch, transformers)."""
  from tokenflex_jax.benchmarking import torch_peer as module
  return module


def _peer_attempt(out: dict[str, Any], options: Options, what: str, fn: Callable[[], Any]
                  ) -> Any:
  """``fn()``, or None once the peer has failed; with ``options.peer_failure_ok`` a
  failure is recorded as out["peer_error"] (naming ``what``) instead of raised."""
  if "peer_error" in out:
    return None
  if not options.peer_failure_ok:
    return fn()
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  (another stack's failure, recorded)
    out["peer_error"] = f"{what}: {type(e).__name__}: {e}"
    logging.warning("the PyTorch peer failed, measuring without it: %s", out["peer_error"])
    return None


def real_data_only(config: RunSpec, workdir: str, options: Options = Options()
                   ) -> dict[str, Any]:
  """The real-data section alone (`real_data.measure`), with the run's device and
  options."""
  os.makedirs(workdir, exist_ok=True)
  out: dict[str, Any] = {"device_kind": jax.devices()[0].device_kind,
                         "device_count": jax.device_count(), "backend": jax.default_backend(),
                         "options": dataclasses.asdict(options)}
  peer = None
  if options.peer:
    peer = _peer_attempt(out, options, "importing it", torch_peer)
  out["real_data"] = real_data.measure(config, workdir, options.rounds,
                                       options.steps_per_round, options.warmup,
                                       peer is not None, setup, peer)
  return out


def benchmark(config: RunSpec, workdir: str,
              options: Options = Options(), out: dict[str, Any] | None = None
              ) -> dict[str, Any]:
  """Runs every measurement; returns the report (`report.write` lays it out). ``out``, if
  given, is filled as figures arrive, so a caller keeps those measured before a failure."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = sharding.mesh_from_config(config)
  tokenizer = run_tokenizer.prepare(config, workdir)
  load_tokenizer = run_tokenizer.loader(config, workdir)
  model = VLM(model_config.vlm_config(config, tokenizer))
  if options.peer:  # its model check comes before any compile
    torch_peer().check(model.config)
  counts = sorted(config.token_counts)
  out = {} if out is None else out
  compute_dtype = str(config.model.llm.dtype)
  out.update({
      "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
      "backend": jax.default_backend(), "batch_size": config.batch_size,
      "text_length": config.data.max_text_length, "compute_dtype": compute_dtype,
      "scan_layers": bool(config.model.scan_layers),
      "remat_policy": config.model.remat_policy, "options": dataclasses.asdict(options)})

  out["roofline_gflops"] = {d: timing.roofline_gflops(d, options.roofline_size)
                            for d in ("float32", "bfloat16")}
  logging.info("roofline: %s GFLOP/s", out["roofline_gflops"])
  roofline = out["roofline_gflops"].get(compute_dtype, out["roofline_gflops"]["float32"])

  ours = setup(config, model, mesh, rules, load_tokenizer)
  out["frozen"] = list(ours.job.optimizer.frozen)
  local = next(ours.task.data_from(0))
  batch = pipeline.to_global_batch(local, compiled.shardings_of(dict(ours.task.abstract_batch)))
  # The peer's start, copied: the state is donated, and on a CPU a fetched array may
  # share the device buffer that the next step overwrites.
  params0 = jax.tree.map(np.array, ours.state.params)
  flops = trainer.flops_per_device(ours.task, ours.job)

  peer = None
  if options.peer:
    def start_peer() -> tuple[Peer, dict[int, tuple[float, float]]]:
      tp = torch_peer()
      device = tp.device_for(jax.default_backend())
      if device == "cpu":
        tp.use_threads(len(os.sched_getaffinity(0)))
      peer_model = tp.build(model.config, params0, config.loss_weighting, device)
      started = Peer(peer_model, tp.optimizer(peer_model, config.optimizer),
                     tp.torch_batch(local, device), config.optimizer.clip_norm)
      # Both models' first loss before either trains, at every bucket (or the largest).
      loss_fn = jax.jit(ours.task.loss_fn, static_argnums=2)
      with sharding.mesh_rules(mesh, rules):
        first = {n: (float(loss_fn(params0, batch, n)[0]),
                     tp.first_loss(peer_model, started.batch, n))
                 for n in (counts if options.first_loss_every_bucket else counts[-1:])}
      out["peer_device"] = device
      return started, first
    peer, first = _peer_attempt(out, options, "building it", start_peer) or (None, None)

  buckets: dict[str, dict[str, Any]] = {}
  peer_ok = lambda: peer is not None and "peer_error" not in out
  for n in counts:
    step = ours.job.steps[n]
    _, ours.state = timing.time_steps(step, ours.state, batch, options.warmup)
    total = compiled.total_bytes(step.memory)
    row: dict[str, Any] = {"compile_s": step.compile_seconds,
                           "compiled_gib": None if total is None else total / 2**30}
    mine, theirs = [], []
    if peer_ok() and n in first:
      row["loss"], row["peer_loss"] = first[n]
    if peer_ok():
      _peer_attempt(out, options, f"warming up at {n} tokens",
                    lambda: peer.times(n, options.warmup, 0))
    for _ in range(options.rounds):
      times, ours.state = timing.time_steps(step, ours.state, batch, options.steps_per_round)
      mine += times
      if peer_ok():
        theirs += _peer_attempt(out, options, f"timing {n} tokens",
                                lambda: peer.times(n, 0, options.steps_per_round)) or []
    t = timing.Timing.of(mine)
    row.update(step_s=t.median, step_spread_s=[t.low, t.high],
               examples_per_s=config.batch_size / t.median,
               gflop_per_step=flops[n] / 1e9, xla_gflop_per_step=step.flops / 1e9,
               gflop_per_s_per_device=flops[n] / t.median / 1e9,
               mfu=timing.mfu(flops[n], t.median, roofline, jax.devices()),
               peak_gib=timing.peak_gib())
    if theirs and peer_ok():
      p = timing.Timing.of(theirs)
      row.update(peer_step_s=p.median, peer_step_spread_s=[p.low, p.high],
                 speedup_vs_peer=p.median / t.median)
    buckets[str(n)] = row
    out["buckets"] = buckets
    logging.info("bucket %d: %s", n, row)
  if options.profile:
    summary, ours.state = profile.profile_step(ours.job.steps[counts[-1]], ours.state, batch,
                                               options.steps_per_round,
                                               os.path.join(workdir, "profile"))
    out["profile"] = {"bucket": counts[-1], **summary}

  probs = dict(zip(config.token_counts, config.token_probs))
  largest = buckets[str(counts[-1])]["step_s"]
  out["mix"] = {str(n): float(probs[n]) for n in counts}
  out["mix_vs_fixed256" if counts[-1] == 256 else "mix_vs_largest"] = float(
      sum(probs[n] * buckets[str(n)]["step_s"] for n in counts) / largest)

  consumed = config.batch_size / min(r["step_s"] for r in buckets.values())
  produced = pipeline_rate(ours.task, config.batch_size, options.pipeline_batches)
  out["pipeline"] = {"examples_per_s": produced, "consumed_examples_per_s": consumed}
  out["pipeline_vs_consumption"] = produced / consumed

  with sharding.mesh_rules(mesh, rules):
    out["generation"] = decode_rates(config, model, params0, tokenizer,
                                     np.asarray(local["image"]), counts[-1],
                                     options.new_tokens, options.rounds)
  out["generation"].update(num_tokens=counts[-1], new_tokens=options.new_tokens,
                           batch=int(local["image"].shape[0]))
  out["kv_cache_speedup"] = out["generation"]["speedup"]

  if options.real_data:
    out["real_data"] = real_data.measure(
        config, workdir, options.rounds, options.steps_per_round, options.warmup,
        peer_ok(), setup, torch_peer() if peer_ok() else None)

  layout = "scanned" if config.model.scan_layers else "unrolled"
  out["compile_s"] = {str(n): buckets[str(n)]["compile_s"] for n in counts}
  out["layouts"] = {layout: {"compile_s": out["compile_s"],
                             "step_s": {str(n): buckets[str(n)]["step_s"] for n in counts}}}
  if options.layouts:
    del ours  # one layout's executables and state at a time
    other_name = "unrolled" if config.model.scan_layers else "scanned"
    other_config = _with_layout(config, not config.model.scan_layers)
    other = setup(other_config, VLM(model_config.vlm_config(other_config, tokenizer)),
                   mesh, rules, load_tokenizer)
    other_steps = {}
    for n in counts:
      _, other.state = timing.time_steps(other.job.steps[n], other.state, batch, options.warmup)
      times, other.state = timing.time_steps(other.job.steps[n], other.state, batch,
                                             options.rounds * options.steps_per_round)
      other_steps[str(n)] = timing.Timing.of(times).median
    out["layouts"][other_name] = {
        "compile_s": {str(n): other.job.steps[n].compile_seconds for n in counts},
        "step_s": other_steps}
  return out
