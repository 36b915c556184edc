"""Building blocks shared by the vision tower, the projector and the decoder.

Every parameter is created through `nn.with_logical_partitioning`, so its logical
axis names travel with it; `sharding.logical_shardings` maps them onto the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokenflex_jax.models import segment_attention

Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()


class DenseGeneral(nn.Module):
  """x [..., *in_dims] @ kernel [*in_dims, *features] (+ bias [*features]).

  The kernel is created at its full shape (flax's DenseGeneral creates a flattened 2-D
  kernel, which would lose the per-dimension logical names), with lecun-normal fan-in
  over all contracted dims.
  """
  features: tuple[int, ...]
  axes: Axes
  num_contract: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = self.num_contract
    in_shape = x.shape[x.ndim - n_in:]
    shape = tuple(in_shape) + tuple(self.features)
    if len(self.axes) != len(shape):
      raise ValueError(f"{self.name}: {len(self.axes)} logical axes {self.axes} for a kernel "
                       f"of shape {shape}")
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, len(shape))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape)
    # The leading dims as one (a view): a product over [B, L] contracts one dim in the
    # weight gradient, which XLA's CPU backend runs without transposing the activations
    # (two contracted dims cost a transposed copy of each; docs/performance.md).
    lead = x.shape[:x.ndim - n_in]
    x = x.reshape((-1,) + tuple(in_shape)) if len(lead) > 1 else x
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                            (contract, ((), ())))
    y = y.reshape(tuple(lead) + tuple(self.features)) if len(lead) > 1 else y
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.axes[n_in:]), tuple(self.features))
      y = y + jnp.asarray(bias, self.dtype)
    return y


def dense(features: int | Sequence[int], axes: Axes, *, num_contract: int = 1,
          use_bias: bool = False, dtype: jnp.dtype = jnp.float32,
          name: str | None = None) -> DenseGeneral:
  """A projection whose kernel (and bias) carry logical axis names.

  ``axes`` names every kernel dimension: the ``num_contract`` trailing input dims
  first, then the output ``features``.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  return DenseGeneral(features, tuple(axes), num_contract, use_bias, dtype, name=name)


class RMSNorm(nn.Module):
  """RMS normalisation over the last axis (Llama / Qwen2). [..., D] -> [..., D]."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("norm",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


def layer_norm(eps: float, dtype: jnp.dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm whose scale and bias carry the logical name ``norm``."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class SwiGLU(nn.Module):
  """silu(x W_gate) * (x W_up) W_down, no biases. [..., D_in] -> [..., out_features]."""
  hidden: int
  out_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gate = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
    up = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
    h = nn.silu(gate) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(self.out_features, ("mlp", "embed"), dtype=self.dtype, name="down")(h)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Grouped-query softmax attention weights, head-major.

  Args:
    q: [B, KV, G, S, Dh] queries (G query heads share each of the KV heads).
    k: [B, KV, T, Dh] keys.
    mask: [B, S, T] bool, True where query s may attend to key t; None: attend to all.
  Returns:
    [B, KV, G, S, T] float32 probabilities.
  """
  b, kv, g, s, d = q.shape
  t = k.shape[2]
  scores = jnp.einsum("bkgsd,bktd->bkgst", q, k)
  # Scaled as [B KV, G S, T], a view of the same values (why: docs/measurements.md).
  scores = scores.reshape(b * kv, g * s, t).astype(jnp.float32) * (d ** -0.5)
  scores = scores.reshape(b, kv, g, s, t)
  if mask is not None:
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


# Attention implementations: "reference" (`reference_attention`), "blocked" (the
# reference on causal query blocks, `causal_block_attention`; full attention is the
# reference), "xla" / "cudnn"
# (`jax.nn.dot_product_attention` with that implementation; cuDNN's fused kernel runs on
# NVIDIA GPUs in bfloat16/float16), "splash" (the Pallas TPU kernel, `models/splash.py`;
# off a TPU it runs interpreted, for tests), "auto": the one chosen per backend.
ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "blocked", "xla", "cudnn", "splash")


def target_platform() -> str:
  """The platform the code being traced is compiled for: that of the devices of the mesh
  set with ``jax.set_mesh`` (e.g. a TPU topology compiled for from a CPU host, `aot`),
  else this process's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def on_tpu_by_default(flag: bool | None) -> bool:
  """A flag that None turns on for a TPU target (`target_platform`) and off elsewhere."""
  return flag if flag is not None else target_platform() == "tpu"


def resolve_attention(name: str, dtype: jnp.dtype, platform: str | None = None) -> str:
  """The implementation "auto" stands for on ``platform`` (default: `target_platform`;
  others are returned as they are): splash on a TPU, cuDNN on a GPU in 16-bit, else the
  blocked reference (measured fastest on a CPU: docs/performance.md)."""
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
  if name != "auto":
    return name
  platform = platform or target_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "blocked"


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      implementation: str = "reference") -> jax.Array:
  """Softmax attention with grouped KV heads and a dense mask.

  Args:
    q: [B, S, H, Dh]; k, v: [B, T, KV, Dh] with H a multiple of KV.
    mask: [B, S, T] bool, or None for full (unmasked) attention.
    implementation: "reference", "xla" or "cudnn" (or "auto", resolved here); a dense
      mask has no structure to skip, so "blocked" is the reference here. Splash and
      causal blocks take their mask as structure instead (causal + key validity), so the
      decoder calls `splash.splash_attention` / `causal_block_attention` itself.
  Returns:
    [B, S, H, Dh].
  """
  implementation = resolve_attention(implementation, q.dtype)
  if implementation == "splash":
    raise ValueError("splash attention takes a causal flag and key validity, not a dense "
                     "mask: call models/splash.py `splash_attention`")
  if implementation in ("reference", "blocked"):
    return reference_attention(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                      implementation=implementation)


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                          implementation: str, segment_ids: jax.Array | None = None
                          ) -> jax.Array:
  """Causal self-attention through ``jax.nn.dot_product_attention`` ("xla" or "cudnn")
  with the mask given as structure where it is one: when every row's valid keys are a
  prefix (right padding, the training layout) the kernel gets ``is_causal=True`` and the
  rows' key counts (``key_value_seq_lengths``), so cuDNN skips the masked tiles; otherwise
  (e.g. left padding, or a packed row's ``segment_ids``) the dense `causal_mask`.
  Chosen on the device per call.

  Args:
    q: [B, S, H, Dh]; k, v: [B, S, KV, Dh], the same slots as the queries.
    key_valid: [B, S] bool, which slots hold real tokens.
    segment_ids: [B, S] int or None, as `causal_mask`'s.
  Returns:
    [B, S, H, Dh], `reference_attention` with `causal_mask` up to rounding (queries
    with no valid key aside: their output is arbitrary in every implementation).
  """
  slots = jnp.arange(q.shape[1])
  lengths = jnp.sum(key_valid, axis=1, dtype=jnp.int32)
  if segment_ids is not None:
    return grouped_attention(q, k, v, causal_mask(key_valid, slots, segment_ids),
                             implementation)
  is_prefix = jnp.all(key_valid == (slots[None, :] < lengths[:, None]))
  structured = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation=implementation)
  dense = lambda q, k, v: grouped_attention(q, k, v, causal_mask(key_valid, slots),
                                            implementation)
  return jax.lax.cond(is_prefix, structured, dense, q, k, v)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | None) -> jax.Array:
  """`grouped_attention` written out: scores in float32, softmax, weighted values.

  The heads are moved in front of the sequence once, so both products are plain batched
  matmuls over contiguous [S, Dh] blocks (why: docs/measurements.md).
  """
  b, s, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)   # [B, KV, G, S, Dh]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # [B, KV, T, Dh]
  probs = attention_weights(qg, kh, mask).astype(v.dtype)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs, vh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def causal_mask(key_valid: jax.Array, query_slots: jax.Array,
                segment_ids: jax.Array | None = None) -> jax.Array:
  """Causal + padding mask: key_valid [B, T], query_slots [S] (or [B, S], a row's own)
  -> [B, S, T] bool, True where the query at slot s may attend to key t (t <= s and the
  key is valid). With ``segment_ids`` [B, T] (self-attention: the keys' and so the
  queries' conversation in a packed row) only keys of the query's own conversation."""
  key_slots = jnp.arange(key_valid.shape[1])
  causal = key_slots <= query_slots[..., None]                    # [(B,) S, T]
  mask = causal & key_valid[:, None, :]
  if segment_ids is None:
    return mask
  query_segments = (jnp.take(segment_ids, query_slots, axis=1) if query_slots.ndim == 1
                    else jnp.take_along_axis(segment_ids, query_slots, axis=1))
  return mask & (query_segments[:, :, None] == segment_ids[:, None, :])


# Query rows per block of `causal_block_attention`, at least: shorter sequences take one
# block (the reference itself); at most `MAX_CAUSAL_BLOCKS` blocks.
MIN_BLOCK_ROWS = 64
MAX_CAUSAL_BLOCKS = 4


def causal_blocks(length: int) -> list[tuple[int, int]]:
  """The query blocks [(start, stop), ...] of `causal_block_attention` for ``length``."""
  count = max(1, min(MAX_CAUSAL_BLOCKS, length // MIN_BLOCK_ROWS))
  bounds = [round(i * length / count) for i in range(count + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           key_valid: jax.Array, segment_ids: jax.Array | None = None
                           ) -> jax.Array:
  """Causal self-attention, `reference_attention`'s math on query blocks.

  Block [a, b) of the queries attends to keys [0, b) only: the tiles above the diagonal
  of the [S, S] scores, which the causal mask would zero, are never computed (with 4
  blocks 3/8 of the scores and of their softmax are skipped). Same values as the
  reference with `causal_mask` up to float32 rounding. A packed row (``segment_ids``)
  goes to `segment_attention.segment_attention`, which also skips the blocks between
  conversations, read from the data (zeros for queries without a valid key).

  Args:
    q: [B, S, H, Dh]; k, v: [B, S, KV, Dh], the same slots as the queries.
    key_valid: [B, S] bool, which slots hold real tokens.
    segment_ids: [B, S] int or None, as `causal_mask`'s.
  Returns:
    [B, S, H, Dh].
  """
  if segment_ids is not None:
    return segment_attention.segment_attention(q, k, v, key_valid, segment_ids)
  return jnp.concatenate([
      reference_attention(q[:, a:b], k[:, :b], v[:, :b],
                          causal_mask(key_valid[:, :b], jnp.arange(a, b)))
      for a, b in causal_blocks(q.shape[1])], axis=1)


# --- Layer stacks ---------------------------------------------------------------------

# What the backward pass keeps of each layer: "none" keeps every activation (no
# rematerialisation), "dots" keeps the matmul outputs and recomputes the rest (the
# elementwise ops, norms, softmax), "dots_except_mlp" keeps the attention's projections
# (`ATTENTION_PROJECTIONS`) and recomputes the MLP from its input (its hidden layer,
# [tokens, mlp_dim] twice in a SwiGLU, is most of what "dots" keeps), "full" keeps only
# the layer's input.
REMAT_POLICIES = ("none", "dots", "dots_except_mlp", "full")
# The name (`jax.ad_checkpoint.checkpoint_name`) of the attention's q, k, v and output
# projections in the ViT's and the LLM's layers.
ATTENTION_PROJECTIONS = "attention_projections"
LAYERS_AXIS = "layers"


def stacked(block: type[nn.Module], length: int, *, remat_policy: str = "none",
            scan: bool = True, in_axes: tuple[Any, ...] = ()) -> type[nn.Module]:
  """``length`` copies of ``block`` whose parameters are stacked on a leading axis.

  Every parameter of the returned module has shape [length, *per-layer shape] and the
  logical axis `LAYERS_AXIS` in front of the block's own names. ``block`` is called as
  ``block(carry, *args) -> (carry, per-layer output)``; ``in_axes`` says, per extra
  argument, ``nn.broadcast`` (the same for every layer) or 0 (sliced per layer, e.g. a
  stacked KV cache). ``scan=True`` runs the layers as one rolled loop (XLA compiles one
  layer); ``scan=False`` unrolls it (one copy per layer): the parameter tree is the
  same either way, and so is ``remat_policy`` (`REMAT_POLICIES`).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {remat_policy!r}")
  if remat_policy != "none":
    policy = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "dots_except_mlp": jax.checkpoint_policies.save_only_these_names(
                  ATTENTION_PROJECTIONS),
              "full": None}[remat_policy]
    block = nn.remat(block, policy=policy, prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length, unroll=1 if scan else length,
                 metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
