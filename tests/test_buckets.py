"""The per-step visual-token bucket: distribution, determinism, validation."""

import collections

import pytest

from tokenflex_jax.training.buckets import Buckets, token_count_for_step, validate_buckets


def test_distribution_follows_probabilities():
  counts = collections.Counter(token_count_for_step(0, s, (64, 144, 256), (0.2, 0.3, 0.5))
                               for s in range(20_000))
  assert set(counts) == {64, 144, 256}
  for n, p in ((64, 0.2), (144, 0.3), (256, 0.5)):
    assert abs(counts[n] / 20_000 - p) < 0.015


def test_pure_function_of_seed_and_step():
  seq = [token_count_for_step(3, s, (64, 144, 256), (0.2, 0.3, 0.5)) for s in range(200)]
  again = [token_count_for_step(3, s, (64, 144, 256), (0.2, 0.3, 0.5)) for s in range(200)]
  other = [token_count_for_step(4, s, (64, 144, 256), (0.2, 0.3, 0.5)) for s in range(200)]
  assert seq == again
  assert seq != other
  # Resuming at step 100 continues the same sequence.
  assert [token_count_for_step(3, s, (64, 144, 256), (0.2, 0.3, 0.5))
          for s in range(100, 200)] == seq[100:]


def test_fixed_baseline_is_a_single_bucket():
  assert {token_count_for_step(0, s, (144,), (1.0,)) for s in range(50)} == {144}


@pytest.mark.parametrize("counts,probs,match", [
    ((64, 150), (0.5, 0.5), "token_counts: num_visual_tokens=150"),
    ((64, 144), (0.5,), "token_probs has 1 entries"),
    ((64, 144), (0.5, 0.6), "sum to 1"),
    ((), (), "empty"),
    ((64, 64), (0.5, 0.5), "duplicates"),
])
def test_validation_names_the_field(counts, probs, match):
  with pytest.raises(ValueError, match=match):
    validate_buckets(counts, probs)


def test_buckets_object_validates_when_made_and_draws_as_the_function():
  from tokenflex_jax import errors
  b = Buckets((64, 144, 256), (0.2, 0.3, 0.5), seed=3)
  assert [b.for_step(s) for s in range(100)] == [
      token_count_for_step(3, s, (64, 144, 256), (0.2, 0.3, 0.5)) for s in range(100)]
  assert {Buckets.single(144).for_step(s) for s in range(20)} == {144}
  with pytest.raises(errors.ConfigError, match="config.token_probs must be non-negative"):
    Buckets((64, 144), (0.5, 0.6))
  with pytest.raises(errors.ConfigError, match="num_visual_tokens=150 is not a positive square"):
    Buckets((64, 150), (0.5, 0.5))


def test_microbatch_counts_continue_the_step_sequence():
  """Microbatch j of step s draws as step s * k + j: a run's microbatch counts are the
  step counts of a run with k times the steps (same mixture, pure in (seed, step))."""
  b = Buckets((64, 144, 256), (0.2, 0.3, 0.5), seed=3)
  assert b.for_microbatches(5, 4) == tuple(b.for_step(20 + j) for j in range(4))
  draws = [b.for_microbatches(s, 4) for s in range(50)]
  assert draws == [b.for_microbatches(s, 4) for s in range(50)]
  assert any(len(set(d)) > 1 for d in draws)  # steps mixing counts
  assert collections.Counter(n for d in draws for n in d)[256] > 60  # about half of 200
