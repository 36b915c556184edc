"""Pallas splash attention (the TPU flash-attention kernel) for grouped-query attention.

`splash_attention` computes what `layers.reference_attention` computes for a causal or
full mask combined with a per-key validity mask, without materialising the [S, T] scores:
the kernel walks [block, block] tiles and skips the tiles the mask rules out. Off a TPU the
same kernel runs in Pallas's interpreter (slow, for tests only).

How the model's masks map onto the kernel:
- causal / full: splash's static `CausalMask` / `FullMask`;
- padding: segment ids, valid keys in segment 1 and padding in segment 0. A valid query
  sees only valid keys; a padding query sees padding keys (at least itself under the
  causal mask), so no softmax row is empty, and its output is ignored downstream;
- a packed row's conversations: their own segment ids (1, 2, ...; padding 0);
- the sequence is padded with segment-0 slots to a multiple of the block size.
Under a device mesh (`jax.set_mesh` + linen's logical rules) the kernel runs per shard
through `jax.shard_map`: the batch split as the rules split "batch", the heads as they
split "kv_heads" (each mesh axis kept where it divides); the sequence stays whole.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from tokenflex_jax import sharding
from tokenflex_jax.models import layers

LANES = 128  # the kernel's tiles are multiples of the TPU lane width
MAX_BLOCK = 512


def block_size(length: int) -> int:
  """The tile size for a sequence padded to a multiple of `LANES`: the largest of
  512 / 256 / 128 that divides it."""
  padded = -(-length // LANES) * LANES
  for block in (MAX_BLOCK, 256, LANES):
    if padded % block == 0:
      return block
  raise AssertionError(padded)


def _kernel(length: int, block: int, group: int, causal: bool, interpret: bool):
  """The splash kernel for one KV head: q [G, L, Dh], k, v [L, Dh], segment ids [L]."""
  shape = (length, length)
  mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa(splash.MultiHeadMask([mask] * group), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     key_segments: jax.Array, causal: bool, pad_head_dim: bool) -> jax.Array:
  """`splash_attention` on one shard (all arrays local): a query attends the keys whose
  ``key_segments`` equal its ``segment_ids``."""
  b, s, h, d = q.shape
  kv = k.shape[2]
  if pad_head_dim and d % LANES:
    # Zero dims change no score and give zero outputs (sliced off); the queries are
    # rescaled so that the kernel's 1/sqrt(padded) is 1/sqrt(Dh).
    padded = -(-d // LANES) * LANES
    widen = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, padded - d),))
    return _local_attention(widen(q * jnp.asarray((padded / d) ** 0.5, q.dtype)), widen(k),
                            widen(v), segment_ids, key_segments, causal, False)[..., :d]
  block = block_size(s)
  pad = -(-s // block) * block - s
  length = s + pad
  segments, keys = (jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad)))          # [B, L]
                    for x in (segment_ids, key_segments))
  # The kernel does not scale the scores: fold 1/sqrt(Dh) into the queries.
  qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, s, kv, h // kv, d)
  qh = jnp.pad(qh.transpose(0, 2, 3, 1, 4), ((0, 0),) * 3 + ((0, pad), (0, 0)))  # [B,KV,G,L,Dh]
  kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))     # [B,KV,L,Dh]
  vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
  kernel = _kernel(length, block, h // kv, causal, layers.target_platform() != "tpu")

  def per_head(qg, kg, vg, seg, key_seg):
    return kernel(qg, kg, vg, segment_ids=splash.SegmentIds(seg, key_seg))

  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, None, None))              # over KV heads
  out = jax.vmap(per_batch)(qh, kh, vh, segments, keys)                      # [B,KV,G,L,Dh]
  return out[:, :, :, :s].transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None,
                     causal: bool, pad_head_dim: bool = False,
                     segment_ids: jax.Array | None = None) -> jax.Array:
  """Softmax attention with grouped KV heads through the splash kernel.

  Args:
    q: [B, S, H, Dh]; k, v: [B, S, KV, Dh] (self-attention: keys are the queries' slots).
    key_valid: [B, S] bool, False for padding; None: every slot is valid.
    causal: slot s attends to slots <= s (else to every valid slot).
    pad_head_dim: zero-pad Dh to a multiple of 128 before the kernel. Off by default:
      the kernel takes any Dh (SigLIP-so400m's ViT has 72; a TPU holds it in whole
      128-lane tiles either way), and padding it first adds pads and slices of its own
      (docs/performance.md). Off a TPU the kernel runs interpreted (tests).
    segment_ids: [B, S] int, a packed row's conversation per slot (0: padding), or None:
      one conversation per row. A query attends the valid keys of its conversation;
      padding queries attend padding keys (their outputs are not used).
  Returns:
    [B, S, H, Dh], equal to `layers.reference_attention` with the matching mask at every
    valid query slot.
  """
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"splash attention is for self-attention; got {q.shape[1]} queries "
                     f"and {k.shape[1]} keys")
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  # An invalid key inside a conversation (padding of an unpacked row, a pad id spelled in a
  # text) matches no query.
  key_segments = (segment_ids if key_valid is None
                  else jnp.where(key_valid | (segment_ids == 0), segment_ids, -1))
  local = functools.partial(_local_attention, causal=causal, pad_head_dim=pad_head_dim)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, segment_ids, key_segments)
  # The rules' axes for the batch and the KV heads, each kept only where it divides the
  # dimension; the query heads follow the KV heads' split so every shard keeps whole
  # groups (H is a multiple of KV).
  batch, _, kv_heads, _ = sharding.fit_spec(
      nn.logical_to_mesh_axes(("batch", None, "kv_heads", None)), k.shape, mesh)[0]
  q_spec = PartitionSpec(batch, None, kv_heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, q_spec, q_spec,
                                                   PartitionSpec(batch, None),
                                                   PartitionSpec(batch, None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, key_segments)
