"""Causal self-attention over packed rows that computes only the blocks a conversation
reaches: the "blocked" implementation's path when a row has segment ids.

A packed row holds several conversations one after another, and each query attends to
the keys of its own conversation at or before it. Almost all of the row's causal
triangle is therefore masked; its [S, S] scores are cut into square blocks of
`BLOCK_ROWS` and, per step, only the blocks that hold an allowed (query, key) pair of some
row of the batch are computed, flash-attention style (running max and sum per query, one
block of keys at a time). The blocks are read from the data at run time (a loop over a
list of block pairs), so the work follows the conversations' lengths: about the sum of
their squares instead of the row's square. A hand-written backward pass walks the same
list (a loop with a data-dependent trip count has no automatic reverse derivative).

Same values as `layers.reference_attention` with `layers.causal_mask` up to float32
rounding, for every query with a valid key in its conversation; other queries (padding)
get zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Query and key rows per block (measured: docs/performance.md, "Packed rows on real data").
BLOCK_ROWS = 128

_MASKED = float(np.finfo(np.float32).min)


def first_keys(key_valid: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """For each slot, the first valid slot of its segment: key_valid, segment_ids [B, S]
  -> [B, S] int32 (S where the segment has no valid slot). A query at s attends to keys
  in [first_keys[s], s] only."""
  length = key_valid.shape[1]
  slots = jnp.where(key_valid, jnp.arange(length, dtype=jnp.int32), length)
  first = jax.vmap(lambda s, g: jax.ops.segment_min(s, g, num_segments=length + 1))(
      slots, segment_ids)
  return jnp.take_along_axis(first, segment_ids, axis=1)


def block_pairs(key_valid: jax.Array, segment_ids: jax.Array, block: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (query block, key block) pairs to compute, for rows of a multiple of ``block``.

  Args:
    key_valid, segment_ids: [B, S] with S = block * nb; segment ids >= 0 and < S + 1.
  Returns:
    (query_block [P], key_block [P], count []), P = nb (nb + 1) / 2: the first ``count``
    pairs are those where some row's query block reaches the key block (at or below the
    diagonal, at or after the earliest first key of the block's queries, and the key
    block holds a valid key), ordered by query block then key block.
  """
  batch, length = key_valid.shape
  blocks = length // block
  first = first_keys(key_valid, segment_ids)
  reaches = first <= jnp.arange(length)[None]                 # the query has a valid key
  lowest = jnp.where(reaches, first, length).reshape(batch, blocks, block).min(axis=(0, 2))
  has_key = key_valid.reshape(batch, blocks, block).any(axis=(0, 2))
  query_block, key_block = (jnp.asarray(a, jnp.int32) for a in np.tril_indices(blocks))
  active = (key_block >= lowest[query_block] // block) & has_key[key_block]
  order = jnp.argsort(~active, stable=True)
  return query_block[order], key_block[order], jnp.sum(active, dtype=jnp.int32)


def _mask(key_valid: jax.Array, segment_ids: jax.Array, i: jax.Array, j: jax.Array,
          block: int) -> jax.Array:
  """[B, block, block] bool: `layers.causal_mask` on query block i and key block j."""
  rows = jnp.arange(block)
  causal = (j * block + rows)[None, :] <= (i * block + rows)[:, None]
  take = lambda x, b: jax.lax.dynamic_slice_in_dim(x, b * block, block, 1)
  same = take(segment_ids, i)[:, :, None] == take(segment_ids, j)[:, None, :]
  return causal[None] & take(key_valid, j)[:, None, :] & same


def _scores(q, k, key_valid, segment_ids, i, j, block):
  """Scaled scores [B, KV, G, block, block] of query block i on key block j, masked."""
  qb = jax.lax.dynamic_slice_in_dim(q, i * block, block, 3)
  kb = jax.lax.dynamic_slice_in_dim(k, j * block, block, 2)
  scores = jnp.einsum("bkgqd,bktd->bkgqt", qb, kb, preferred_element_type=jnp.float32)
  mask = _mask(key_valid, segment_ids, i, j, block)[:, None, None]
  return mask, jnp.where(mask, scores * q.shape[-1] ** -0.5, _MASKED)


def _forward(q, k, v, key_valid, segment_ids, block):
  """Head-major q [B, KV, G, S, Dh], k, v [B, KV, S, Dh] -> (out like q, log-sum-exp
  [B, KV, G, S] float32, the block pairs)."""
  pairs = block_pairs(key_valid, segment_ids, block)
  query_block, key_block, count = pairs
  at = lambda x, b, axis: jax.lax.dynamic_slice_in_dim(x, b * block, block, axis)
  put = lambda x, y, b, axis: jax.lax.dynamic_update_slice_in_dim(x, y, b * block, axis)

  def step(n, carry):
    out, top, total = carry                      # running sum of p v, max, sum of p
    i, j = query_block[n], key_block[n]
    mask, scores = _scores(q, k, key_valid, segment_ids, i, j, block)
    old_top = at(top, i, 3)
    new_top = jnp.maximum(old_top, scores.max(axis=-1))
    p = jnp.where(mask, jnp.exp(scores - new_top[..., None]), 0.0)
    scale = jnp.exp(old_top - new_top)
    new_total = at(total, i, 3) * scale + p.sum(axis=-1)
    new_out = at(out, i, 3) * scale[..., None] + jnp.einsum(
        "bkgqt,bktd->bkgqd", p.astype(v.dtype), at(v, j, 2),
        preferred_element_type=jnp.float32)
    return put(out, new_out, i, 3), put(top, new_top, i, 3), put(total, new_total, i, 3)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32),
          jnp.zeros(q.shape[:-1], jnp.float32))
  out, top, total = jax.lax.fori_loop(0, count, step, init)
  seen = total > 0
  out = out / jnp.where(seen, total, 1.0)[..., None]
  lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
  return out.astype(q.dtype), lse, pairs


def _backward(q, k, v, key_valid, segment_ids, block, out, lse, pairs, d_out):
  """Gradients (dq, dk, dv) of `_forward`'s output, over the same block pairs."""
  query_block, key_block, count = pairs
  at = lambda x, b, axis: jax.lax.dynamic_slice_in_dim(x, b * block, block, axis)
  add = lambda x, y, b, axis: jax.lax.dynamic_update_slice_in_dim(
      x, at(x, b, axis) + y, b * block, axis)
  rowdot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  f32 = dict(preferred_element_type=jnp.float32)

  def step(n, grads):
    dq, dk, dv = grads
    i, j = query_block[n], key_block[n]
    mask, scores = _scores(q, k, key_valid, segment_ids, i, j, block)
    p = jnp.where(mask, jnp.exp(scores - at(lse, i, 3)[..., None]), 0.0)
    do = at(d_out, i, 3)
    dp = jnp.einsum("bkgqd,bktd->bkgqt", do, at(v, j, 2), **f32)
    ds = p * (dp - at(rowdot, i, 3)[..., None]) * q.shape[-1] ** -0.5
    dq = add(dq, jnp.einsum("bkgqt,bktd->bkgqd", ds.astype(k.dtype), at(k, j, 2), **f32), i, 3)
    dk = add(dk, jnp.einsum("bkgqt,bkgqd->bktd", ds.astype(q.dtype), at(q, i, 3), **f32), j, 2)
    dv = add(dv, jnp.einsum("bkgqt,bkgqd->bktd", p.astype(do.dtype), do, **f32), j, 2)
    return dq, dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = jax.lax.fori_loop(0, count, step, (zeros(q), zeros(k), zeros(v)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, key_valid, segment_ids, block):
  return _forward(q, k, v, key_valid, segment_ids, block)[0]


def _attend_fwd(q, k, v, key_valid, segment_ids, block):
  out, lse, pairs = _forward(q, k, v, key_valid, segment_ids, block)
  return out, (q, k, v, key_valid, segment_ids, out, lse, pairs)


def _attend_bwd(block, residuals, d_out):
  q, k, v, key_valid, segment_ids, out, lse, pairs = residuals
  grads = _backward(q, k, v, key_valid, segment_ids, block, out, lse, pairs, d_out)
  return (*grads, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                      segment_ids: jax.Array, block: int = BLOCK_ROWS) -> jax.Array:
  """Causal self-attention within segments, computing only the blocks they reach.

  Args:
    q: [B, S, H, Dh]; k, v: [B, S, KV, Dh], the same slots as the queries (H a multiple
      of KV).
    key_valid: [B, S] bool, which slots hold real tokens.
    segment_ids: [B, S] int in [0, S], each slot's conversation (`layers.causal_mask`).
    block: query and key rows per block.
  Returns:
    [B, S, H, Dh].
  """
  b, s, h, d = q.shape
  kv = k.shape[2]
  pad = -s % block
  if pad:
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, key_valid, segment_ids = map(widen, (q, k, v, key_valid, segment_ids))
  heads = q.reshape(b, s + pad, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  out = _attend(heads, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_valid,
                segment_ids.astype(jnp.int32), block)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s + pad, h, d)[:, :s]
