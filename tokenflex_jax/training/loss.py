"""Answer-token cross-entropy with the two per-sample weightings, from logits or from
hidden states in chunks of the sequence (so [B, T, V] logits never exist at once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tokenflex_jax import errors

WEIGHTINGS = ("sqrt", "token_mean")


def check_weighting(weighting: str) -> None:
  """Raises `errors.ConfigError` unless ``config.loss_weighting`` is one of `WEIGHTINGS`."""
  if weighting not in WEIGHTINGS:
    raise errors.ConfigError(f"config.loss_weighting must be one of {WEIGHTINGS}, "
                             f"got {weighting!r}")


def token_weights(loss_mask: jax.Array, weighting: str,
                  segments: jax.Array | None = None) -> jax.Array:
  """[B, T] weights: the mask itself, or the mask / sqrt(answer tokens of the sample):
  of the row, or with ``segments`` [B, T] (a packed row's conversation ids) of the
  token's conversation, so that a packed conversation weighs what it would alone."""
  check_weighting(weighting)
  if weighting == "token_mean":
    return loss_mask
  if segments is None:
    per_sample = jnp.sum(loss_mask, axis=1, keepdims=True)
  else:
    b, t = segments.shape
    ids = (jnp.arange(b)[:, None] * (t + 1) + segments).reshape(-1)
    totals = jax.ops.segment_sum(loss_mask.reshape(-1), ids, num_segments=b * (t + 1))
    per_sample = totals[ids].reshape(b, t)
  return loss_mask * jax.lax.rsqrt(jnp.maximum(per_sample, 1.0))


def answer_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                weighting: str, segments: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy over answer tokens.

  Args:
    logits: [B, T, V] predictions aligned with targets.
    targets: [B, T] int token ids.
    loss_mask: [B, T] float, 1 on answer tokens.
    weighting: "sqrt" or "token_mean".
    segments: [B, T] int, a packed row's conversation ids, or None (`token_weights`).
  Returns:
    (scalar loss, {"token_accuracy", "answer_tokens"}).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return _weighted(ce, jnp.argmax(logits, axis=-1), targets, loss_mask, weighting, segments)


def _weighted(ce: jax.Array, predicted: jax.Array, targets: jax.Array, loss_mask: jax.Array,
              weighting: str, segments: jax.Array | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Both losses' tail: per-token cross-entropy ce [B, T] and argmax ids predicted [B, T]
  -> (the weighted mean over answer tokens, {"token_accuracy", "answer_tokens",
  "loss_weight": the mean's normaliser, for gradient accumulation (`steps.LOSS_WEIGHT`)})."""
  w = token_weights(loss_mask, weighting, segments)
  total = jnp.maximum(jnp.sum(w), 1e-9)
  loss = jnp.sum(ce * w) / total
  correct = (predicted == targets) * loss_mask
  n = jnp.sum(loss_mask)
  return loss, {"token_accuracy": jnp.sum(correct) / jnp.maximum(n, 1.0), "answer_tokens": n,
                "loss_weight": total}


def chunked_answer_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        loss_mask: jax.Array, weighting: str, vocab_chunk: int,
                        segments: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`answer_loss` of the logits ``hidden @ head``, ``vocab_chunk`` vocabulary entries
  at a time.

  The log-sum-exp, the target's logit and the argmax are accumulated over chunks of
  the vocabulary (an online softmax), so only [B, T, vocab_chunk] logits exist at a
  time, in the forward pass and in the backward pass (which recomputes each chunk's
  logits); the head's gradient is written chunk by chunk, with no accumulator. The same
  values as `answer_loss` up to float32 rounding; ``vocab_chunk`` <= 0 or >= V is
  `answer_loss` itself.

  Args:
    hidden: [B, T, D] final hidden states aligned with targets (compute dtype).
    head: [D, V] output projection (logits = hidden @ head, then float32).
    targets, loss_mask, weighting, segments: as `answer_loss`.
    vocab_chunk: vocabulary entries per chunk; V is padded up to a multiple of it.
  """
  d, v = head.shape
  if vocab_chunk <= 0 or vocab_chunk >= v:
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype))
    return answer_loss(logits.astype(jnp.float32), targets, loss_mask, weighting, segments)
  chunks = -(-v // vocab_chunk)
  padded = jnp.pad(head, [(0, 0), (0, chunks * vocab_chunk - v)])
  heads = jnp.moveaxis(padded.reshape(d, chunks, vocab_chunk), 1, 0)  # [chunks, D, C]
  offsets = jnp.arange(chunks) * vocab_chunk

  @jax.checkpoint
  def body(carry, xs):
    # The running max is both the log-sum-exp's shift and the argmax's best logit.
    top, total, target_logit, best_index = carry           # each [B, T]
    w, offset = xs
    z = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)
    column = offset + jnp.arange(vocab_chunk)
    z = jnp.where(column < v, z, -jnp.inf)                # padded columns
    chunk_top = jnp.max(z, axis=-1)
    new_top = jnp.maximum(top, chunk_top)
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(z - new_top[..., None]), -1)
    here = (targets >= offset) & (targets < offset + vocab_chunk)
    picked = jnp.take_along_axis(z, jnp.clip(targets - offset, 0, vocab_chunk - 1)[..., None],
                                 axis=-1)[..., 0]
    target_logit = target_logit + jnp.where(here, picked, 0.0)
    better = chunk_top > top                              # ties keep the first, as argmax
    best_index = jnp.where(better, offset + jnp.argmax(z, axis=-1), best_index)
    return (new_top, total, target_logit, best_index), None

  shape = targets.shape
  start = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape),
           jnp.zeros(shape, jnp.int32))
  (top, total, target_logit, best_index), _ = jax.lax.scan(body, start, (heads, offsets))
  return _weighted(top + jnp.log(total) - target_logit, best_index, targets, loss_mask,
                   weighting, segments)
