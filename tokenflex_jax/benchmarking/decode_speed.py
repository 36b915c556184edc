"""Greedy decoding with the KV cache against recomputing the whole sequence per token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tokenflex_jax.evaluation.generate import make_generate
from tokenflex_jax.models.vlm import VLM

NEVER = -1  # an end-of-sequence id no token has: every call decodes all its new tokens


def make_recompute_generate(model: VLM, max_new_tokens: int
                            ) -> Callable[[Any, jax.Array, jax.Array, int], jax.Array]:
  """generate(params, images [B, H, W, 3], prompts [B, P] left-padded, num_tokens) ->
  ids [B, max_new_tokens]: greedy decoding without a cache. The ViT runs once; every new
  token then reruns the LLM over the whole sequence (prompt, visual tokens and the
  tokens generated so far, in a buffer of static length P + max_new_tokens)."""
  def generate(params, images, prompts, num_tokens):
    variables = {"params": params}
    b, p = prompts.shape
    patches = model.apply(variables, images, method=VLM.patches)
    head = model.apply(variables, method=VLM.output_head)
    pad = model.config.pad_token_id
    tokens = jnp.concatenate([prompts, jnp.full((b, max_new_tokens), pad, prompts.dtype)], 1)

    def body(i, tokens):
      hidden = model.apply(variables, None, tokens, num_tokens, patches,
                           method=VLM.text_hidden)                       # [B, T, D]
      last = jax.lax.dynamic_slice_in_dim(hidden, p + i, 1, axis=1)[:, 0]
      token = jnp.argmax(last @ head.astype(last.dtype), axis=-1).astype(tokens.dtype)
      return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], p + i, axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, body, tokens)[:, p:]
  return generate


def cached_and_recomputed(model: VLM, max_new_tokens: int
                          ) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """The two jitted decoders, (params, images, prompts) -> ids, ``num_tokens`` static:
  the project's own (`evaluation.generate`, KV cache) and `make_recompute_generate`."""
  cached = make_generate(model, max_new_tokens, NEVER, model.config.pad_token_id)
  recompute = make_recompute_generate(model, max_new_tokens)
  return (jax.jit(lambda params, images, prompts, n: cached(params, images, prompts, n)[0],
                  static_argnums=3),
          jax.jit(recompute, static_argnums=3))
