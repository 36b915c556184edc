"""Pallas splash attention (run interpreted on this CPU) against the reference attention:
values and gradients, padding, grouped heads, a sharded mesh, and the whole VLM."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax import sharding
from tokenflex_jax.models import layers, splash
from tokenflex_jax.models import llm as llm_lib
from tests.test_models import _images_tokens, small_vlm


def _inputs(batch=2, length=140, heads=4, kv_heads=2, head_dim=16):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
  slots = np.arange(length)
  # Row 0: right padding after 100 slots; row 1: left padding of 9 slots (both occur).
  key_valid = jnp.asarray(np.stack([slots < 100, slots >= 9] + [slots >= 0] * (batch - 2)))
  return q, k, v, key_valid


def _check_against_reference(q, k, v, key_valid, causal, fn):
  mask = (layers.causal_mask(key_valid, jnp.arange(q.shape[1])) if causal
          else jnp.broadcast_to(key_valid[:, None, :], key_valid.shape[:1] + key_valid.shape[1:] * 2))
  ref = lambda *a: layers.reference_attention(*a, mask)
  valid = np.asarray(key_valid)
  np.testing.assert_allclose(np.asarray(fn(q, k, v))[valid], np.asarray(ref(q, k, v))[valid],
                             rtol=1e-5, atol=1e-5)
  # The loss reads valid query slots only (padding queries are ignored downstream).
  weights = jax.random.normal(jax.random.key(1), q.shape) * key_valid[:, :, None, None]
  loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)
  for got, want in zip(jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal,pad_head_dim", [(True, False), (False, False), (False, True)])
def test_splash_equals_the_reference_with_padding_and_grouped_heads(causal, pad_head_dim):
  """140 slots (padded to 256 inside, blocks of 256); Dh 16 as it is (the default), or
  zero-padded to 128."""
  q, k, v, key_valid = _inputs()
  fn = jax.jit(lambda *a: splash.splash_attention(*a, key_valid, causal=causal,
                                                  pad_head_dim=pad_head_dim))
  _check_against_reference(q, k, v, key_valid, causal, fn)


def test_splash_under_a_sharded_mesh_equals_the_reference():
  """Batch over data x fsdp, heads over tensor (FSDP_TP_RULES): the kernel runs per shard."""
  q, k, v, key_valid = _inputs(batch=4, length=130)
  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.mesh_rules(mesh, sharding.FSDP_TP_RULES):
    spec = nn.logical_to_mesh_sharding(nn.logical_to_mesh_axes(("batch", None, "heads", None)),
                                       mesh, sharding.FSDP_TP_RULES)
    q = jax.device_put(q, jax.sharding.NamedSharding(mesh, spec.spec))
    fn = jax.jit(lambda *a: splash.splash_attention(*a, key_valid, causal=True))
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    _check_against_reference(q, k, v, key_valid, True, fn)


def test_block_size_is_the_largest_tile_dividing_the_padded_length():
  assert [splash.block_size(n) for n in (1, 128, 130, 384, 512, 640, 1000, 1024)] == [
      128, 128, 256, 128, 512, 128, 512, 512]


def test_vlm_with_splash_matches_the_reference_and_decodes():
  """ViT (full) and LLM (causal + padding) through splash: the same logits at real
  tokens; decoding with a KV cache falls back to the dense mask."""
  images, tokens = _images_tokens()
  ref = small_vlm()
  fast = dataclasses.replace(ref, config=dataclasses.replace(ref.config, attention="splash"))
  params = ref.init(jax.random.key(0), images, tokens, 16)
  got = jax.jit(lambda p: fast.apply(p, images, tokens, 16))(params)
  want = ref.apply(params, images, tokens, 16)
  real = np.asarray(tokens != 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4, atol=1e-5)
  # Prefill with a KV cache: the ViT through splash, the LLM through the dense mask.
  prompts = tokens[:, :5]
  cache = llm_lib.init_cache(ref.config.llm, 2, prompts.shape[1] - 1 + 16)
  got = fast.apply(params, images, prompts, 16, cache, method=type(ref).prefill)[0]
  want = ref.apply(params, images, prompts, 16, cache, method=type(ref).prefill)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="self-attention"):
    q, k, v, _ = _inputs()
    splash.splash_attention(q, k[:, :10], v[:, :10], None, causal=True)
  with pytest.raises(ValueError, match="not a dense mask"):
    layers.grouped_attention(*_inputs()[:3], None, implementation="splash")
