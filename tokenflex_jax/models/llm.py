"""Decoder-only language model of the Llama / Qwen2 family, with a KV cache.

RMSNorm, rotary position embeddings, grouped-query attention (optional q/k/v bias),
SwiGLU MLP, tied or untied output embedding. The cache is an explicit pytree passed
in and returned, so generation is a pure function that jits cleanly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from tokenflex_jax.models import layers, splash

# Stacked over the layers: {"k": [depth, B, T_max, KV, Dh], "v": the same}.
KVCache = dict[str, jax.Array]
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int = 256
  width: int = 96
  depth: int = 2
  num_heads: int = 2
  num_kv_heads: int = 1
  head_dim: int = 48
  mlp_dim: int = 256
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = True
  dtype: str = "float32"
  # RoPE frequency scaling, as a Hugging Face config's ``rope_scaling``: "default" (none),
  # "linear" (every frequency / rope_factor) or "llama3" (Llama 3.1: wavelengths above
  # rope_original_max_positions / rope_low_freq_factor are stretched by rope_factor,
  # those below rope_original_max_positions / rope_high_freq_factor kept, a smooth
  # blend between). Plain scalars, so configs and flags can carry them.
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  max_positions: int = 32768  # max_position_embeddings: metadata, no parameter depends on it

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"LLMConfig.rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")


def init_cache(config: LLMConfig, batch: int, max_length: int,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
  """An all-zero cache for ``max_length`` positions."""
  shape = (config.depth, batch, max_length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def rope_frequencies(config: LLMConfig) -> np.ndarray:
  """Inverse frequencies [Dh // 2] (float32) of the config's RoPE, scaling applied.

  Computed in float32 in the same order as Hugging Face's ``ROPE_INIT_FUNCTIONS`` so that
  the rotation angles (position * frequency) agree bit for bit.
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / np.float32(config.rope_theta) ** exponents
  factor = np.float32(config.rope_factor)
  if config.rope_type == "linear":
    return inv_freq / factor
  if config.rope_type == "llama3":
    context = np.float32(config.rope_original_max_positions)
    low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
    wavelength = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < context / high) & ~(wavelength > context / low)
    return np.where(medium, blended, scaled).astype(np.float32)
  return inv_freq


def rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, half-split layout (as Llama/Qwen2 in HF).

  x: [B, S, H, Dh]; positions: [B, S]; inv_freq: [Dh // 2] from `rope_frequencies`.
  """
  half = x.shape[-1] // 2
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles)[:, :, None, :]  # [B, S, 1, half]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def at_slots(x: jax.Array, slots: jax.Array | None) -> jax.Array:
  """x [B, S, ...] at slots [B, Q] -> [B, Q, ...]; x itself for slots None."""
  if slots is None:
    return x
  return jnp.take_along_axis(x, slots.reshape(slots.shape + (1,) * (x.ndim - 2)), axis=1)


class Attention(nn.Module):
  """Grouped-query attention with rotary positions, optionally writing a KV cache.

  x [B, S, D] -> ([B, S, D], or [B, Q, D] with ``output_slots`` [B, Q]; the updated cache
  or None). With ``output_slots`` only those slots query (the keys and values, and the
  cache, still come from every slot).
  """
  config: LLMConfig
  implementation: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  @nn.compact
  def __call__(self, x, positions, key_valid, cache, cache_index, segment_ids=None,
               output_slots=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    q = layers.dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                     use_bias=cfg.qkv_bias, dtype=dtype, name="q")(at_slots(x, output_slots))
    k = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                     use_bias=cfg.qkv_bias, dtype=dtype, name="k")(x)
    v = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                     use_bias=cfg.qkv_bias, dtype=dtype, name="v")(x)
    q, k, v = (checkpoint_name(a, layers.ATTENTION_PROJECTIONS) for a in (q, k, v))
    inv_freq = rope_frequencies(cfg)
    q = rotary(q, at_slots(positions, output_slots), inv_freq)
    k = rotary(k, positions, inv_freq)
    new_cache = None
    if cache is not None:
      start = (0, cache_index, 0, 0)
      new_cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                                     start),
                   "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                                     start)}
    # A prefill (the cache filled from slot 0) attends to its own keys, as training does:
    # the cache's later slots are all in the future.
    own_keys = cache is None or (isinstance(cache_index, int) and cache_index == 0)
    implementation = layers.resolve_attention(self.implementation, dtype)
    self_attention = own_keys and output_slots is None
    if own_keys:
      key_valid = key_valid[:, :x.shape[1]]
    if self_attention and implementation == "splash":
      out = splash.splash_attention(q, k, v, key_valid, causal=True, segment_ids=segment_ids)
    elif self_attention and implementation == "blocked":
      out = layers.causal_block_attention(q, k, v, key_valid, segment_ids)
    elif self_attention and implementation in ("xla", "cudnn"):
      out = layers.causal_self_attention(q, k, v, key_valid, implementation, segment_ids)
    else:
      # A dense mask: a self-attention reference; queries at some slots only; decoding
      # (queries at cache_index.., keys over the whole cache). Splash and causal blocks
      # are for self-attention, so the reference ("blocked" is it on a dense mask).
      implementation = "reference" if implementation == "splash" else implementation
      query_slots = jnp.arange(x.shape[1]) if output_slots is None else output_slots
      if not own_keys:
        query_slots = cache_index + query_slots
        k, v = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
      out = layers.grouped_attention(q, k, v,
                                     layers.causal_mask(key_valid, query_slots, segment_ids),
                                     implementation)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    out = layers.dense(cfg.width, ("heads", "head_dim", "embed"), num_contract=2,
                       dtype=dtype, name="o")(out)
    return checkpoint_name(out, layers.ATTENTION_PROJECTIONS), new_cache


class DecoderLayer(nn.Module):
  """One pre-norm layer: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)).

  x [B, S, D] (the carry of a layer stack) -> (x [B, S, D], this layer's updated cache
  slice {"k", "v": [B, T_max, KV, Dh]} or None). With ``output_slots`` [B, Q] the output
  is [B, Q, D], those slots' alone: the keys and values still come from every slot.
  """
  config: LLMConfig
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  @nn.compact
  def __call__(self, x, positions, key_valid, cache, cache_index, segment_ids=None,
               output_slots=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    y = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="attn_norm")(x)
    y, new_cache = Attention(cfg, self.attention, name="attn")(
        y, positions, key_valid, cache, cache_index, segment_ids, output_slots)
    x = nn.with_logical_constraint(at_slots(x, output_slots) + y, ("batch", "length", "embed"))
    y = layers.RMSNorm(cfg.rms_norm_eps, dtype, name="mlp_norm")(x)
    y = layers.SwiGLU(cfg.mlp_dim, cfg.width, dtype=dtype, name="mlp")(y)
    return nn.with_logical_constraint(x + y, ("batch", "length", "embed")), new_cache


# Per layer of a stack: positions, key_valid, cache_index and segment ids are shared, the
# cache is sliced.
LAYER_IN_AXES = (nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast)


class LLM(nn.Module):
  """Token ids [B, S] -> logits [B, S, V]; `decode` runs on embeddings with a cache."""
  config: LLMConfig
  # Performance flags; the parameter tree is the same whatever they say (the layers'
  # weights are stacked under "layers", [depth, ...]): what the backward pass keeps of
  # each layer (`layers.REMAT_POLICIES`), and a rolled loop over the layers (True) or
  # an unrolled one.
  remat_policy: str = "none"
  scan_layers: bool = True
  attention: str = "auto"  # `layers.ATTENTION_IMPLEMENTATIONS`

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.width))
    self.layers = layers.stacked(DecoderLayer, cfg.depth, remat_policy=self.remat_policy,
                                 scan=self.scan_layers, in_axes=LAYER_IN_AXES
                                 )(cfg, self.attention)
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
    if not cfg.tie_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"),
                                  dtype=jnp.dtype(cfg.dtype))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[B, S] int -> [B, S, D]."""
    x = jnp.take(jnp.asarray(self.embedding), tokens, axis=0).astype(self.config.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def output_head(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype: the embedding's transpose
    (tied) or the ``lm_head`` kernel. The one head of training (the chunked loss) and
    decoding (`logits`)."""
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_embeddings:
      return jnp.asarray(self.embedding, dtype).T
    if self.is_initializing():  # creates lm_head/kernel
      self.lm_head(jnp.zeros((1, self.config.width), dtype))
    return jnp.asarray(nn.unbox(self.lm_head.variables["params"]["kernel"]), dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states [B, S, D] (already normalised) -> logits [B, S, V] in float32."""
    head = self.output_head()
    out = jnp.einsum("bsd,dv->bsv", hidden.astype(head.dtype), head)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def decode(self, x: jax.Array, positions: jax.Array, key_valid: jax.Array,
             cache: KVCache | None = None, cache_index: Any = 0,
             segment_ids: jax.Array | None = None, output_slots: jax.Array | None = None
             ) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder stack on input embeddings.

    Args:
      x: [B, S, D] input embeddings.
      positions: [B, S] rotary positions.
      key_valid: [B, T] bool, which key slots hold real tokens; T = S without a cache,
        T = T_max (the cache length) with one.
      cache: optional `KVCache`; the new keys/values are written at ``cache_index``.
      cache_index: slot of x's first token in the cache (int or scalar array; the int 0,
        a prefill, attends to x's own keys as training does).
      segment_ids: [B, S] int (no cache): a packed row's conversation per slot (0:
        padding); a query attends only to keys of its own conversation. None: one per row.
      output_slots: [B, Q] int, the only slots whose states are wanted (a prefill wants
        each prompt's last), or None: all. The last layer then computes its keys and
        values at every slot (the cache holds them) but its queries, attention and MLP
        only at these.
    Returns:
      (final normalised hidden states [B, S, D], or [B, Q, D] at ``output_slots``;
      updated cache or None).
    """
    if segment_ids is not None and cache is not None:
      raise ValueError("segment ids are for training rows (self-attention), not a cache")
    if output_slots is None:
      x, cache = self.layers(x, positions, key_valid, cache, cache_index, segment_ids)
    else:
      x, cache = self._layers_to_slots(x, positions, key_valid, cache, cache_index,
                                       segment_ids, output_slots)
    return self.final_norm(x), cache

  def _layers_to_slots(self, x, positions, key_valid, cache, cache_index, segment_ids,
                       output_slots):
    """`self.layers` on the same parameters, its last layer at ``output_slots`` only
    (`decode`): the layers below as a stack of depth - 1, then the last one."""
    cfg = self.config
    params = nn.unbox(self.layers.variables["params"])  # [depth, ...] each
    below = lambda tree: jax.tree.map(lambda a: a[:-1], tree)
    top = lambda tree: jax.tree.map(lambda a: a[-1], tree)
    new_cache = None
    # Modules of their own (parent=None), applied to slices of this one's parameters.
    if cfg.depth > 1:
      stack = layers.stacked(DecoderLayer, cfg.depth - 1, remat_policy=self.remat_policy,
                             scan=self.scan_layers, in_axes=LAYER_IN_AXES
                             )(cfg, self.attention, parent=None)
      x, new_cache = stack.apply({"params": below(params)}, x, positions, key_valid,
                                 None if cache is None else below(cache), cache_index,
                                 segment_ids)
    x, top_cache = DecoderLayer(cfg, self.attention, parent=None).apply(
        {"params": top(params)}, x, positions, key_valid, None if cache is None else top(cache),
        cache_index, segment_ids, output_slots)
    if cache is not None:
      new_cache = {name: (top_cache[name][None] if new_cache is None else
                          jnp.concatenate([new_cache[name], top_cache[name][None]]))
                   for name in cache}
    return x, new_cache

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Plain causal LM: [B, S] -> logits [B, S, V] (no padding, no cache)."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    hidden, _ = self.decode(self.embed(tokens), positions, jnp.ones((b, s), bool))
    return self.logits(hidden)
