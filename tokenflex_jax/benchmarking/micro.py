"""The measurements behind the profile's reading (docs/performance.md), each in isolation.

- `matmul_seconds`: ``count`` independent [m, k] x [k, n] float32 matmuls in one jitted
  call (1: one matmul on every thread; 2: the runtime runs them side by side);
- `attention_seconds`: forward + backward of the decoder's causal attention alone, per
  implementation, at given shapes, all keys valid;
- `step_ab`: the config's train step at one bucket for two attention implementations,
  compiled in one process and timed in alternating rounds.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax import errors, model_config, sharding, specs
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.benchmarking import suite, timing
from tokenflex_jax.data import pipeline
from tokenflex_jax.models import layers
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import compiled


def matmul_seconds(m: int, k: int, n: int, count: int = 1, calls: int = 10) -> float:
  """Median seconds of one call computing ``count`` independent x [m, k] @ w_i [k, n]."""
  keys = jax.random.split(jax.random.key(0), count + 1)
  x = jax.random.normal(keys[0], (m, k))
  ws = [jax.random.normal(key, (k, n)) for key in keys[1:]]
  fn = jax.jit(lambda x, ws: [x @ w for w in ws])
  jax.block_until_ready(fn(x, ws))
  return timing.Timing.of(timing.time_calls(lambda: fn(x, ws), calls)).median


def attention_seconds(implementation: str, batch: int, length: int, heads: int,
                      kv_heads: int, head_dim: int, calls: int = 10) -> float:
  """Median seconds of forward + backward (gradients of q, k, v) of causal attention:
  "blocked" is `layers.causal_block_attention`, any other name `layers.grouped_attention`
  with `layers.causal_mask`."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
  weights = jax.random.normal(keys[3], q.shape)
  key_valid = jnp.ones((batch, length), bool)
  if implementation == "blocked":
    attend = lambda q, k, v: layers.causal_block_attention(q, k, v, key_valid)
  else:
    mask = layers.causal_mask(key_valid, jnp.arange(length))
    attend = lambda q, k, v: layers.grouped_attention(q, k, v, mask, implementation)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * weights), (0, 1, 2)))
  jax.block_until_ready(grad(q, k, v))
  return timing.Timing.of(timing.time_calls(lambda: grad(q, k, v), calls)).median


def step_ab(config: RunSpec, workdir: str, num_tokens: int,
            implementations: tuple[str, str], rounds: int = 4, steps_per_round: int = 3,
            warmup: int = 2) -> dict[str, float]:
  """{implementation: median seconds per train step} at bucket ``num_tokens``: both steps
  compiled in this process, then timed in alternating rounds."""
  mesh, rules = sharding.mesh_from_config(config)
  tokenizer = run_tokenizer.prepare(config, workdir)
  runs: dict[str, list[Any]] = {}
  for name in implementations:
    variant = specs.replace(config, model__attention=name)
    setup = suite.setup(variant, VLM(model_config.vlm_config(variant, tokenizer)), mesh,
                        rules, run_tokenizer.loader(variant, workdir))
    batch = pipeline.to_global_batch(next(setup.task.data_from(0)), compiled.shardings_of(
        dict(setup.task.abstract_batch)))
    step = setup.job.steps[num_tokens]
    _, state = timing.time_steps(step, setup.state, batch, warmup)
    runs[name] = [step, state, batch, []]
  for _ in range(rounds):
    for run in runs.values():
      seconds, run[1] = timing.time_steps(run[0], run[1], run[2], steps_per_round)
      run[3] += seconds
  return {name: float(np.median(run[3])) for name, run in runs.items()}


def main_report(config: RunSpec, workdir: str, num_tokens: int) -> str:
  """Every measurement at the bench config's shapes (the decoder's sequence at
  ``num_tokens``), as markdown lines."""
  if num_tokens not in config.token_counts:
    raise errors.ConfigError(f"--num_tokens={num_tokens} is not one of config.token_counts "
                             f"{tuple(config.token_counts)}")
  os.makedirs(workdir, exist_ok=True)
  llm = config.model.llm
  m = config.batch_size * (num_tokens + config.data.max_text_length - 1)
  lines = [f"float32 matmuls [{m}, {llm.width}] x [{llm.width}, {llm.mlp_dim}]:"]
  flop = 2 * m * llm.width * llm.mlp_dim
  for count in (1, 2):
    s = matmul_seconds(m, llm.width, llm.mlp_dim, count)
    lines.append(f"- {count} independent in one call: {s * 1e3:.1f} ms, "
                 f"{count * flop / s / 1e9:.0f} GFLOP/s")
  length = num_tokens + config.data.max_text_length - 1
  lines.append(f"causal attention alone, forward + backward, batch {config.batch_size}, "
               f"{length} positions, {llm.num_heads} heads on {llm.num_kv_heads}:")
  for name in ("reference", "blocked"):
    s = attention_seconds(name, config.batch_size, length, llm.num_heads,
                          llm.num_kv_heads, llm.head_dim)
    lines.append(f"- {name}: {s * 1e3:.1f} ms")
  ab = step_ab(config, workdir, num_tokens, ("reference", "blocked"))
  lines.append(f"train step at {num_tokens} tokens, alternating rounds: reference "
               f"{ab['reference'] * 1e3:.0f} ms, blocked {ab['blocked'] * 1e3:.0f} ms "
               f"({ab['blocked'] / ab['reference']:.3f}x)")
  return "\n".join(lines)
