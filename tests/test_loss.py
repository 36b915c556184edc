"""The answer-token loss: "sqrt" and "token_mean" weightings against a NumPy reference
of their definitions, padding invariance, accuracy and token counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.training.loss import WEIGHTINGS, answer_loss, chunked_answer_loss, token_weights

B, T, V = 4, 7, 11


def _batch(lengths, seed=0):
  """Logits, targets and a loss mask whose row i has ``lengths[i]`` answer tokens, at
  the end of the row (prompt first, as in the data), rows padded at varying places."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(len(lengths), T, V)).astype(np.float32) * 2
  targets = rng.integers(0, V, size=(len(lengths), T)).astype(np.int32)
  mask = np.zeros((len(lengths), T), np.float32)
  for i, n in enumerate(lengths):
    start = 1 + i % 2
    mask[i, start:start + n] = 1.0
  return logits, targets, mask


def _ce(logits, targets):
  z = logits.astype(np.float64)
  logz = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
  return logz - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def _reference(logits, targets, mask, weighting):
  """sqrt: each answer token of a row weighted by 1/sqrt(the row's answer tokens),
  normalised by the sum of weights; token_mean: the mean over all answer tokens."""
  ce = _ce(logits, targets)
  if weighting == "token_mean":
    return float(np.sum(ce * mask) / np.sum(mask))
  total, weight = 0.0, 0.0
  for row_ce, row_mask in zip(ce, mask):
    n = row_mask.sum()
    if n:
      total += np.sum(row_ce * row_mask) / np.sqrt(n)
      weight += n / np.sqrt(n)
  return float(total / weight)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_matches_the_definition(weighting):
  """Rows of 1, 2, 4 and 5 answer tokens (and one without any): the loss equals the
  NumPy reference of the weighting."""
  logits, targets, mask = _batch([1, 2, 4, 5, 0])
  loss, _ = answer_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), weighting)
  assert float(loss) == pytest.approx(_reference(logits, targets, mask, weighting), rel=1e-5)


def test_token_weights():
  """token_mean weights are the mask; sqrt weights are mask / sqrt(row's answer
  tokens), zero for a row without answer tokens."""
  _, _, mask = _batch([1, 4, 0, 5])
  np.testing.assert_array_equal(token_weights(jnp.asarray(mask), "token_mean"), mask)
  sqrt = np.asarray(token_weights(jnp.asarray(mask), "sqrt"))
  for row, m in zip(sqrt, mask):
    n = m.sum()
    np.testing.assert_allclose(row, m / np.sqrt(n) if n else 0 * m, rtol=1e-6)


def test_weightings_differ_only_for_unequal_lengths():
  """With answers of different lengths the two weightings give different losses;
  with equal lengths (any padding layout) they agree."""
  loss = lambda b, w: float(answer_loss(*map(jnp.asarray, b), w)[0])
  unequal = _batch([1, 5, 2, 4])
  assert abs(loss(unequal, "sqrt") - loss(unequal, "token_mean")) > 1e-3
  equal = _batch([3, 3, 3, 3])
  assert loss(equal, "sqrt") == pytest.approx(loss(equal, "token_mean"), rel=1e-6)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_padding_never_affects_the_loss(weighting):
  """Changing logits and targets where the mask is 0 changes neither the loss nor the
  metrics, and the gradient there is exactly zero."""
  logits, targets, mask = _batch([1, 5, 2, 4])
  rng = np.random.default_rng(9)
  pad = mask[..., None] == 0
  other_logits = np.where(pad, rng.normal(size=logits.shape) * 50, logits).astype(np.float32)
  other_targets = np.where(mask == 0, rng.integers(0, V, size=targets.shape), targets)
  a, ma = answer_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), weighting)
  b, mb = answer_loss(jnp.asarray(other_logits), jnp.asarray(other_targets.astype(np.int32)),
                      jnp.asarray(mask), weighting)
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  assert float(ma["token_accuracy"]) == float(mb["token_accuracy"])
  grad = jax.grad(lambda l: answer_loss(l, jnp.asarray(targets), jnp.asarray(mask),
                                        weighting)[0])(jnp.asarray(logits))
  assert np.all(np.asarray(grad)[np.broadcast_to(pad, grad.shape)] == 0)
  assert np.any(np.asarray(grad) != 0)


def test_accuracy_and_answer_tokens():
  """token_accuracy: the fraction of answer tokens whose argmax is the target (padding
  ignored, even where it is right); answer_tokens: the number of answer tokens."""
  logits, targets, mask = _batch([1, 5, 2, 4], seed=3)
  # Make the padding positions all correct, and a known subset of the answers.
  right = np.zeros_like(mask, bool)
  right[mask == 0] = True
  answers = np.argwhere(mask == 1)
  for i, j in answers[::3]:
    right[i, j] = True
  for i in range(logits.shape[0]):
    for j in range(T):
      if right[i, j]:
        logits[i, j, targets[i, j]] = logits[i, j].max() + 1.0
      elif np.argmax(logits[i, j]) == targets[i, j]:
        targets[i, j] = (targets[i, j] + 1) % V
  _, metrics = answer_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), "sqrt")
  assert float(metrics["answer_tokens"]) == mask.sum() == 12
  assert float(metrics["token_accuracy"]) == pytest.approx(len(answers[::3]) / mask.sum())


def test_no_answer_tokens_is_finite():
  """A batch without answer tokens gives a zero, finite loss and accuracy."""
  logits, targets, mask = _batch([0, 0])
  loss, metrics = answer_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                              "sqrt")
  assert float(loss) == 0.0 and float(metrics["token_accuracy"]) == 0.0
  assert float(metrics["answer_tokens"]) == 0.0


def test_unknown_weighting_names_the_config_field():
  """Any other weighting is a ValueError naming config.loss_weighting and the value."""
  logits, targets, mask = _batch([1, 2])
  with pytest.raises(ValueError, match=r"config.loss_weighting .*'mean'"):
    token_weights(jnp.asarray(mask), "mean")
  with pytest.raises(ValueError, match="config.loss_weighting"):
    answer_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), "per_sample")


@pytest.mark.parametrize("vocab_chunk", [1, 3, 4, V])
def test_chunked_loss_equals_the_whole_loss(vocab_chunk):
  """The loss from hidden states and the head, a vocabulary chunk at a time (padding V
  up to a multiple of the chunk where it does not divide it), has the values, metrics
  and gradients of the loss on the whole [B, T, V] logits."""
  rng = np.random.default_rng(4)
  logits, targets, mask = _batch([1, 5, 2, 4, 0])
  hidden = jnp.asarray(rng.normal(size=(len(mask), T, 6)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(6, V)), jnp.float32)
  # Make some answers right, so the accuracy is not 0.
  targets = np.where(rng.random(targets.shape) < 0.5,
                     np.argmax(np.asarray(hidden @ head), -1), targets).astype(np.int32)
  whole = lambda h, w: answer_loss(h @ w, jnp.asarray(targets), jnp.asarray(mask), "sqrt")
  chunked = lambda h, w: chunked_answer_loss(h, w, jnp.asarray(targets), jnp.asarray(mask),
                                             "sqrt", vocab_chunk)
  (a, ma), ga = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(hidden, head)
  (b, mb), gb = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
  assert float(b) == pytest.approx(float(a), rel=1e-6)
  assert 0 < float(ma["token_accuracy"]) < 1
  assert float(mb["token_accuracy"]) == float(ma["token_accuracy"])
  assert float(mb["answer_tokens"]) == float(ma["answer_tokens"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), gb, ga)
  # Chunked, no [B, T, V] array exists anywhere in the forward or backward pass.
  shapes = str(jax.make_jaxpr(jax.grad(lambda h, w: chunked(h, w)[0]))(hidden, head))
  assert (f"f32[{len(mask)},{T},{V}]" in shapes) == (vocab_chunk >= V)
