"""Batched greedy decoding with the KV cache."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax.errors import InputError
from tokenflex_jax.data.tokenizer import Tokenizer
from tokenflex_jax.models.llm import init_cache
from tokenflex_jax.models.vlm import VLM, image_slots


def make_generate(model: VLM, max_new_tokens: int, eos_id: int, pad_id: int
                  ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns generate(params, images [B,H,W,3] or [B,K,H,W,3], prompts [B,P] left-padded
  (at most K image placeholders each), num_tokens, patches=None) -> (ids [B,
  max_new_tokens] int32, confidence [B] float32).

  After the end-of-sequence token every position of ids holds ``pad_id``; decoding
  stops once every row has ended (the prefill gives the first token, each decoding step
  one more). The confidence is the answer's mean token log-probability, over its tokens
  up to and including the end-of-sequence token. With ``patches`` [B, (K,) L, C]
  (`VLM.patches` of the images) the ViT is not run again (``images`` may then be None).
  """
  def generate(params, images, prompts, num_tokens, patches=None):
    b, p = prompts.shape
    prompt_length = p + image_slots(images, patches) * (num_tokens - 1)
    cache = init_cache(model.config.llm, b, prompt_length + max_new_tokens,
                       jnp.dtype(model.config.llm.dtype))
    logits, cache, key_valid, position = model.apply(
        {"params": params}, images, prompts, num_tokens, cache, patches, method=VLM.prefill)

    def record(i, logits, out, done, logprob, length):
      """Picks answer token i from its logits [B, V]; the pad after a row has ended."""
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                          token[:, None], axis=-1)[:, 0]
      out = out.at[:, i].set(jnp.where(done, pad_id, token))
      logprob = logprob + jnp.where(done, 0.0, token_logprob)
      length = length + (~done).astype(jnp.float32)
      return token, out, done | (token == eos_id), logprob, length

    def body(carry):
      # One decoding step per token still wanted: token i - 1 in, token i out.
      i, token, cache, out, done, logprob, length = carry
      logits, cache = model.apply({"params": params}, token, position + i - 1, cache,
                                  key_valid, prompt_length + i - 1, method=VLM.decode_step)
      token, out, done, logprob, length = record(i, logits, out, done, logprob, length)
      return i + 1, token, cache, out, done, logprob, length

    def more(carry):
      i, done = carry[0], carry[4]
      return (i < max_new_tokens) & ~jnp.all(done)

    zeros = jnp.zeros((b,), jnp.float32)
    token, out, done, logprob, length = record(
        0, logits, jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), bool),
        zeros, zeros)
    _, _, _, out, _, logprob, length = jax.lax.while_loop(
        more, body, (1, token, cache, out, done, logprob, length))
    return out, logprob / jnp.maximum(length, 1.0)

  return generate


def encode_prompts(tokenizer: Tokenizer, questions: list[str], max_length: int,
                   image_first: bool = True) -> np.ndarray:
  """Chat-formatted prompts, left-padded so every answer starts at the same slot. [B, P]."""
  out = np.full((len(questions), max_length), tokenizer.pad_id, np.int32)
  for i, question in enumerate(questions):
    ids = tokenizer.prompt_ids(question, image_first)
    if len(ids) > max_length:
      raise InputError(f"question needs {len(ids)} prompt tokens but "
                       f"config.eval.max_prompt_length is {max_length}: {question!r}")
    out[i, max_length - len(ids):] = ids
  return out
