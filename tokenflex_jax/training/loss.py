"""Answer-token cross-entropy with the two per-sample weightings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

WEIGHTINGS = ("sqrt", "token_mean")


def token_weights(loss_mask: jax.Array, weighting: str) -> jax.Array:
  """[B, T] weights: the mask itself, or the mask / sqrt(answer tokens of the row)."""
  if weighting == "token_mean":
    return loss_mask
  if weighting == "sqrt":
    per_row = jnp.sum(loss_mask, axis=1, keepdims=True)
    return loss_mask * jax.lax.rsqrt(jnp.maximum(per_row, 1.0))
  raise ValueError(f"config.loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def answer_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                weighting: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy over answer tokens.

  Args:
    logits: [B, T, V] predictions aligned with targets.
    targets: [B, T] int token ids.
    loss_mask: [B, T] float, 1 on answer tokens.
    weighting: "sqrt" or "token_mean".
  Returns:
    (scalar loss, {"token_accuracy", "answer_tokens"}).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  w = token_weights(loss_mask, weighting)
  loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-9)
  correct = (jnp.argmax(logits, axis=-1) == targets) * loss_mask
  n = jnp.sum(loss_mask)
  return loss, {"token_accuracy": jnp.sum(correct) / jnp.maximum(n, 1.0), "answer_tokens": n}
