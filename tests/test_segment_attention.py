"""Attention over packed rows that computes only the blocks a conversation reaches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tokenflex_jax import sharding
from tokenflex_jax.models import layers
from tokenflex_jax.models.segment_attention import block_pairs, first_keys, segment_attention


def packed(lengths: list[list[int]], slots: int) -> tuple[jax.Array, jax.Array]:
  """key_valid, segment_ids [B, slots]: row b holds conversations of ``lengths[b]`` one
  after another (ids 1, 2, ...), then padding (id 0, not valid)."""
  valid = np.zeros((len(lengths), slots), bool)
  segments = np.zeros((len(lengths), slots), np.int32)
  for b, row in enumerate(lengths):
    at = 0
    for n, length in enumerate(row):
      valid[b, at:at + length], segments[b, at:at + length] = True, n + 1
      at += length
  return jnp.asarray(valid), jnp.asarray(segments)


def qkv(batch: int, slots: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, slots, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, slots, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, slots, 2, 8)), jnp.float32)
  return q, k, v


def test_block_pairs_skip_the_blocks_between_conversations():
  # Two conversations of 32 slots in 64, blocks of 16: query block 2 starts the second
  # conversation, so it needs key block 2 only: 6 of the triangle's 10 pairs.
  valid, segments = packed([[32, 32]], 64)
  qb, kb, count = block_pairs(valid, segments, 16)
  pairs = list(zip(np.asarray(qb)[:int(count)].tolist(), np.asarray(kb)[:int(count)].tolist()))
  assert pairs == [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3)]
  # A batch computes what any of its rows needs; key blocks of padding only are skipped.
  valid, segments = packed([[32, 32], [40]], 64)
  qb, kb, count = block_pairs(valid, segments, 16)
  got = set(zip(np.asarray(qb)[:int(count)].tolist(), np.asarray(kb)[:int(count)].tolist()))
  assert got == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 2), (3, 3)}
  np.testing.assert_array_equal(first_keys(valid, segments)[1, [0, 39, 40, 63]], [0, 0, 64, 64])


@pytest.mark.parametrize("lengths", [[[70, 5, 100, 40], [1, 150, 30]], [[200], [13, 13, 13]]])
def test_equals_the_masked_reference(lengths):
  """Values and gradients of queries with a valid key equal the reference with the
  packed causal mask (blocks of 32 over 215 slots, grouped KV heads); padding queries
  get zeros and finite gradients."""
  slots = 215
  valid, segments = packed(lengths, slots)
  q, k, v = qkv(len(lengths), slots)
  mask = layers.causal_mask(valid, jnp.arange(slots), segments)
  ref = lambda q, k, v: layers.reference_attention(q, k, v, mask)
  ours = lambda q, k, v: segment_attention(q, k, v, valid, segments, block=32)
  seen = np.asarray(valid)[:, :, None, None]
  out = np.asarray(jax.jit(ours)(q, k, v))
  np.testing.assert_allclose(np.where(seen, out, 0), np.where(seen, ref(q, k, v), 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.where(seen, 0, out), 0)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * seen
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)
  for g, r in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v),
                  jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_blocked_attention_takes_it_for_packed_rows_on_a_sharded_batch():
  """`layers.causal_block_attention` with segment ids, jitted over the 8-device mesh with
  the batch split, equals the reference (the block pairs are agreed over the batch)."""
  lengths = [[100, 60], [30, 30, 30], [160], [5, 150], [80, 80], [1, 1, 100], [20], [159]]
  slots = 160
  valid, segments = packed(lengths, slots)
  q, k, v = qkv(8, slots, seed=2)
  mesh = sharding.make_mesh((8, 1, 1))
  split = NamedSharding(mesh, P("data"))
  args = jax.device_put((q, k, v, valid, segments), split)
  out = jax.jit(layers.causal_block_attention)(*args)
  ref = layers.reference_attention(q, k, v, layers.causal_mask(valid, jnp.arange(slots),
                                                                segments))
  seen = np.asarray(valid)[:, :, None, None]
  np.testing.assert_allclose(np.where(seen, out, 0), np.where(seen, ref, 0), rtol=1e-5,
                             atol=1e-6)
