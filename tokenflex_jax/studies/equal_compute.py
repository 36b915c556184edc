"""Training steps that give a fixed-count model the training FLOPs of a mixed one.

A fixed-count baseline trained for the same number of steps as TokenFLEX spends fewer
FLOPs when its count is below TokenFLEX's mean (the LLM's positions grow with the
count). `matched_steps` gives it the steps that spend what TokenFLEX spends, by the
model-FLOPs formula of `models.flops` (the expected FLOPs of TokenFLEX's step over its
count draws).
"""

from __future__ import annotations

from tokenflex_jax import model_config
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.models import flops
from tokenflex_jax.specs import RunSpec


def step_flops(config: RunSpec, tokenizer: ChatTokenizer, count: int) -> float:
  """Model FLOPs of one train step of ``config`` at ``count`` visual tokens."""
  model = model_config.vlm_config(config, tokenizer)
  return flops.vlm_train_flops(model, count, config.data.max_text_length, config.batch_size,
                               {name: m > 0 for name, m in config.lr_multipliers.items()})


def mean_step_flops(config: RunSpec, tokenizer: ChatTokenizer) -> float:
  """The expected FLOPs of a step of ``config`` over its count draws (token_probs)."""
  return sum(p * step_flops(config, tokenizer, n)
             for n, p in zip(config.token_counts, config.token_probs))


def matched_steps(reference: RunSpec, fixed: RunSpec, tokenizer: ChatTokenizer) -> int:
  """The steps at which ``fixed`` (one count) spends ``reference``'s training FLOPs."""
  if len(fixed.token_counts) != 1:
    raise ValueError(f"matched_steps: {fixed.token_counts} is not one count")
  total = reference.total_steps * mean_step_flops(reference, tokenizer)
  return round(total / step_flops(fixed, tokenizer, fixed.token_counts[0]))
