"""The training iterator's order: each epoch a new permutation of the source, batches
across an epoch's end (nothing dropped), resumable by position, and the same global
order whatever the number of processes."""

import numpy as np
import pytest

from tokenflex_jax import errors
from tokenflex_jax.data import pipeline


def _batches(source, global_batch, count, seed=0, start_batch=0):
  it = pipeline.make_iterator(source, pipeline.IDENTITY, global_batch, seed=seed,
                              start_batch=start_batch)
  return [np.asarray(next(it)).tolist() for _ in range(count)]


def test_every_epoch_is_a_new_permutation_and_no_example_is_dropped():
  order = sum(_batches(list(range(10)), 4, 10), [])  # 40 positions: 4 epochs of 10
  epochs = [order[e * 10:(e + 1) * 10] for e in range(4)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 4  # reshuffled each epoch
  assert sum(_batches(list(range(10)), 4, 10, seed=1), []) != order


def test_a_source_smaller_than_a_batch_repeats_within_it():
  (batch,) = _batches(list(range(3)), 8, 1)
  assert sorted(set(batch)) == [0, 1, 2] and len(batch) == 8


def test_resuming_at_a_batch_reads_the_same_batches():
  assert _batches(list(range(10)), 4, 6, start_batch=5) == _batches(list(range(10)), 4, 11)[5:]


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_read_their_rows_of_the_same_global_batches(monkeypatch, processes):
  """Each of P processes (jax.process_index/count as P processes see them) reads its
  B / P rows of the global batches one process reads, across epochs and resumed."""
  one = _batches(list(range(10)), 6, 7)
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: processes)
  for start in (0, 3):
    hosts = []
    for index in range(processes):
      monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
      hosts.append(_batches(list(range(10)), 6, 7 - start, start_batch=start))
    assert [sum((h[b] for h in hosts), []) for b in range(7 - start)] == one[start:]


def test_an_empty_source_is_one_line():
  with pytest.raises(errors.InputError, match=r"^the training data has no examples"):
    pipeline.make_iterator([], pipeline.IDENTITY, 4, seed=0)
